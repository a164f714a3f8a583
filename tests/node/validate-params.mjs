// validate-params.mjs SCHEMA CASES: compiles a job-parameter schema (proto/params/*.json) with
// ajv in strict mode, which also checks the schema itself, then validates each case of CASES
// (a JSON array of {"params", "valid", "worker_only"?}) and exits 1 when the schema's verdict
// differs from "valid". Cases marked worker_only are rules the schema cannot state (the
// worker's C validator checks them): the schema must accept them.
import { readFileSync } from 'node:fs';
import Ajv2020 from 'ajv/dist/2020.js';

const [schemaPath, casesPath] = process.argv.slice(2);
if (!schemaPath || !casesPath) {
  console.error('usage: validate-params.mjs SCHEMA CASES');
  process.exit(2);
}
// strictRequired stays off: "at least one of lower and upper" is written as anyOf of
// required lists, which name properties declared at the top level, not in the branch
const ajv = new Ajv2020({ allErrors: true, strict: true, strictRequired: false });
const validate = ajv.compile(JSON.parse(readFileSync(schemaPath, 'utf8')));
const cases = JSON.parse(readFileSync(casesPath, 'utf8'));
let bad = 0;
cases.forEach((c, i) => {
  const want = c.worker_only ? true : c.valid;
  const got = validate(c.params);
  const what = JSON.stringify(c.params);
  if (got !== want) {
    bad++;
    console.log(`case ${i}: ${what}: schema says ${got ? 'valid' : 'invalid'}, expected ` +
      `${want ? 'valid' : 'invalid'}${got ? '' : ': ' + ajv.errorsText(validate.errors)}`);
  }
});
console.log(`${cases.length} cases, ${bad} disagree with the schema`);
process.exit(bad ? 1 : 0);
