// validate-rules.mjs SCHEMA FILE...: validates each rules file (RADPIPE_RULES_FILE format)
// against proto/rules/rules.schema.json with ajv in strict mode. Prints one line per file,
// "valid" or "invalid: <errors>", and exits 1 when any file is invalid or not JSON.
import { readFileSync } from 'node:fs';
import Ajv2020 from 'ajv/dist/2020.js';

const [schemaPath, ...files] = process.argv.slice(2);
if (!schemaPath || files.length === 0) {
  console.error('usage: validate-rules.mjs SCHEMA FILE...');
  process.exit(2);
}
const ajv = new Ajv2020({ allErrors: true, strict: true });
const validate = ajv.compile(JSON.parse(readFileSync(schemaPath, 'utf8')));
let bad = 0;
for (const f of files) {
  let doc;
  try {
    doc = JSON.parse(readFileSync(f, 'utf8'));
  } catch (e) {
    console.log(`${f}: not JSON: ${e.message}`);
    bad++;
    continue;
  }
  if (validate(doc)) {
    console.log(`${f}: valid`);
  } else {
    console.log(`${f}: invalid: ${ajv.errorsText(validate.errors)}`);
    bad++;
  }
}
process.exit(bad ? 1 : 0);
