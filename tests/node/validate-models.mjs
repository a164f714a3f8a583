// validate-models.mjs SCHEMA CASES [MODEL_JSON...]: compiles the model description schema
// (proto/models/model.schema.json) with ajv in strict mode, which also checks the schema
// itself; validates each case of CASES (a JSON array of {"model", "valid", "worker_only"?})
// and exits 1 when the schema's verdict differs from "valid" (cases marked worker_only are
// rules the schema cannot state, checked by the gpu-segmenter's C loader: the schema must
// accept them); then every MODEL_JSON file given (the committed models' model.json) must be
// valid.
import { readFileSync } from 'node:fs';
import Ajv2020 from 'ajv/dist/2020.js';

const [schemaPath, casesPath, ...files] = process.argv.slice(2);
if (!schemaPath || !casesPath) {
  console.error('usage: validate-models.mjs SCHEMA CASES [MODEL_JSON...]');
  process.exit(2);
}
const ajv = new Ajv2020({ allErrors: true, strict: true, strictRequired: false });
const validate = ajv.compile(JSON.parse(readFileSync(schemaPath, 'utf8')));
const cases = JSON.parse(readFileSync(casesPath, 'utf8'));
let bad = 0;
cases.forEach((c, i) => {
  const want = c.worker_only ? true : c.valid;
  const got = validate(c.model);
  if (got !== want) {
    bad++;
    console.log(`case ${i} (${c.why || ''}): schema says ${got ? 'valid' : 'invalid'}, expected ` +
      `${want ? 'valid' : 'invalid'}${got ? '' : ': ' + ajv.errorsText(validate.errors)}`);
  }
});
for (const f of files) {
  if (!validate(JSON.parse(readFileSync(f, 'utf8')))) {
    bad++;
    console.log(`${f}: ${ajv.errorsText(validate.errors)}`);
  }
}
console.log(`${cases.length} cases and ${files.length} model files, ${bad} disagree with the schema`);
process.exit(bad ? 1 : 0);
