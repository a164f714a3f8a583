// validate-events.mjs SCHEMA_DIR FILE: validates every JSON line of FILE (CloudEvents read
// back from Kafka) against proto/events/<base>.json, chosen by the event's type
// ("radpipe.study.completed" -> study.completed.json). Prints one line per event and exits
// 1 when any event is invalid or has no schema.
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import Ajv2020 from 'ajv/dist/2020.js';
import addFormats from 'ajv-formats';

const [dir, file] = process.argv.slice(2);
if (!dir || !file) {
  console.error('usage: validate-events.mjs SCHEMA_DIR FILE');
  process.exit(2);
}
const ajv = new Ajv2020({ allErrors: true, strict: true });
addFormats(ajv);
const validators = new Map();
for (const f of readdirSync(dir).filter((n) => n.endsWith('.json'))) {
  const schema = JSON.parse(readFileSync(join(dir, f), 'utf8'));
  validators.set('radpipe.' + f.slice(0, -5), ajv.compile(schema));
}
let bad = 0;
let n = 0;
for (const line of readFileSync(file, 'utf8').split('\n')) {
  if (!line.trim()) continue;
  n++;
  let ev;
  try {
    ev = JSON.parse(line);
  } catch (e) {
    console.log(`event ${n}: not JSON: ${e.message}`);
    bad++;
    continue;
  }
  const v = validators.get(ev.type);
  if (!v) {
    console.log(`event ${n}: no schema for type ${JSON.stringify(ev.type)}`);
    bad++;
  } else if (!v(ev)) {
    console.log(`event ${n} (${ev.type}): invalid: ${ajv.errorsText(v.errors)}`);
    bad++;
  } else {
    console.log(`event ${n} (${ev.type}): valid`);
  }
}
console.log(`${n} events, ${bad} invalid`);
process.exit(bad || n === 0 ? 1 : 0);
