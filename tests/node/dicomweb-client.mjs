// dicomweb-client.mjs CONFIG: drives the gateway's DICOMweb services with dicomweb-client
// (the npm library OHIF Viewer uses; XMLHttpRequest from xhr2) as a viewer would. CONFIG is
// a JSON file written by tests/integration/test_dicomweb.c:
//   {"url": "http://127.0.0.1:PORT", "token": "...", "patient_id": "...",
//    "patient_name": "...", "study_date": "YYYYMMDD", "study": UID, "series": UID,
//    "files": [{"path": "...", "sop": UID}, ...]}
// It stores the files (STOW-RS, one request), waits until the index has them, finds the
// study by PatientID, by a wildcard PatientName and by a StudyDate range (and checks that
// ranges and names that must not match do not), lists its series and instances, retrieves
// the metadata of the study, the series and one instance, and one instance and the whole
// series, comparing the bytes with the files. Prints one line per check; exits 1 when any
// check failed, 2 on a usage error.
import { readFileSync } from 'node:fs';
import { createHash } from 'node:crypto';
import XMLHttpRequest from 'xhr2';
import dicomweb from 'dicomweb-client';

globalThis.XMLHttpRequest = XMLHttpRequest;

const configPath = process.argv[2];
if (!configPath) {
  console.error('usage: dicomweb-client.mjs CONFIG');
  process.exit(2);
}
const cfg = JSON.parse(readFileSync(configPath, 'utf8'));
const client = new dicomweb.api.DICOMwebClient({
  url: `${cfg.url}/dicomweb`,
  headers: { Authorization: `Bearer ${cfg.token}` },
});

let failed = 0;
function check(ok, what, detail = '') {
  console.log(`${ok ? 'ok' : 'FAIL'} ${what}${!ok && detail ? `: ${detail}` : ''}`);
  if (!ok) failed++;
  return ok;
}

// DICOM JSON helpers: the first value of a tag, or undefined
const first = (ds, tag) => (ds && ds[tag] && Array.isArray(ds[tag].Value) ? ds[tag].Value[0] : undefined);
const uidsOf = (list, tag) => new Set((list || []).map((ds) => first(ds, tag)));
const sha = (buf) => createHash('sha256').update(Buffer.from(buf)).digest('hex');
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// YYYYMMDD shifted by days
function shiftDate(yyyymmdd, days) {
  const d = new Date(Date.UTC(+yyyymmdd.slice(0, 4), +yyyymmdd.slice(4, 6) - 1, +yyyymmdd.slice(6, 8)));
  d.setUTCDate(d.getUTCDate() + days);
  return d.toISOString().slice(0, 10).replaceAll('-', '');
}

async function studiesWhere(queryParams) {
  return client.searchForStudies({ queryParams });
}

async function main() {
  const files = cfg.files.map((f) => {
    const b = readFileSync(f.path);
    return { ...f, bytes: b, buffer: b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength) };
  });

  // STOW-RS: every file in one multipart/related request
  const stored = await client.storeInstances({ datasets: files.map((f) => f.buffer) });
  const answer = typeof stored === 'string' ? JSON.parse(stored) : stored;
  const refs = (answer && answer['00081199'] && answer['00081199'].Value) || [];
  check(refs.length === files.length, 'STOW-RS stored every instance',
    `ReferencedSOPSequence has ${refs.length} of ${files.length} items: ${JSON.stringify(answer)}`);
  check(!answer['00081198'], 'STOW-RS reports no failed instance', JSON.stringify(answer['00081198']));
  check(files.every((f, i) => first(refs[i], '00081155') === f.sop),
    'STOW-RS references the SOP Instance UIDs in request order');
  check(String(first(answer, '00081190') || '').endsWith(`/dicomweb/studies/${cfg.study}`),
    'STOW-RS answers the study\'s RetrieveURL', JSON.stringify(answer['00081190']));

  // the indexer indexes asynchronously: wait until QIDO-RS sees every instance
  let found = [];
  for (let i = 0; i < 600; i++) {
    found = await studiesWhere({ PatientID: cfg.patient_id });
    const s = found.find((ds) => first(ds, '0020000D') === cfg.study);
    if (s && first(s, '00201208') === files.length) break;
    await sleep(200);
  }
  const study = found.find((ds) => first(ds, '0020000D') === cfg.study);
  check(Boolean(study), 'QIDO-RS finds the study by PatientID', JSON.stringify(found));
  check(first(study, '00201208') === files.length, 'QIDO-RS counts every instance of the study',
    JSON.stringify(study && study['00201208']));
  check(first(study, '00100020') === cfg.patient_id, 'QIDO-RS returns the PatientID');
  check(first(study, '00080020') === cfg.study_date, 'QIDO-RS returns the StudyDate');

  // wildcard PatientName: a prefix with *, a single-character ?, and a name that does not match
  const name = cfg.patient_name;
  const prefix = `${name.slice(0, Math.max(1, name.length - 3))}*`;
  const oneChar = `${name.slice(0, -1)}?`;
  for (const [q, want] of [[prefix, true], [oneChar, true], [`${name}x*`, false], ['*', true]]) {
    const res = await studiesWhere({ PatientName: q });
    check(uidsOf(res, '0020000D').has(cfg.study) === want,
      `QIDO-RS PatientName=${q} ${want ? 'finds' : 'does not find'} the study`, JSON.stringify(res));
  }

  // StudyDate ranges: around the date, open-ended on either side, and one that excludes it
  const d = cfg.study_date;
  const ranges = [
    [`${shiftDate(d, -1)}-${shiftDate(d, 1)}`, true],
    [`${d}-`, true],
    [`-${d}`, true],
    [`${d}-${d}`, true],
    [`${shiftDate(d, 1)}-${shiftDate(d, 30)}`, false],
    [`-${shiftDate(d, -1)}`, false],
  ];
  for (const [q, want] of ranges) {
    const res = await studiesWhere({ StudyDate: q, PatientID: cfg.patient_id });
    check(uidsOf(res, '0020000D').has(cfg.study) === want,
      `QIDO-RS StudyDate=${q} ${want ? 'finds' : 'does not find'} the study`, JSON.stringify(res));
  }

  // series and instances of the study
  const series = await client.searchForSeries({ studyInstanceUID: cfg.study });
  check(series.length === 1 && first(series[0], '0020000E') === cfg.series,
    'QIDO-RS lists the study\'s one series', JSON.stringify(series));
  check(first(series[0], '00201209') === files.length, 'QIDO-RS counts the series\' instances');
  const instances = await client.searchForInstances({
    studyInstanceUID: cfg.study, seriesInstanceUID: cfg.series,
  });
  const sops = new Set(files.map((f) => f.sop));
  const got = uidsOf(instances, '00080018');
  check(got.size === sops.size && [...sops].every((s) => got.has(s)),
    'QIDO-RS lists every instance of the series', JSON.stringify([...got]));

  // metadata: study, series, instance
  const meta = await client.retrieveStudyMetadata({ studyInstanceUID: cfg.study });
  const metaSops = uidsOf(meta, '00080018');
  check(meta.length === files.length && [...sops].every((s) => metaSops.has(s)),
    'WADO-RS study metadata has one data set per instance', `${meta.length} data sets`);
  check(meta.every((ds) => first(ds, '00100020') === cfg.patient_id
    && first(ds, '0020000D') === cfg.study && first(ds, '0020000E') === cfg.series),
  'WADO-RS metadata carries the patient, study and series of each instance');
  check(meta.every((ds) => ds['7FE00010'] && typeof ds['7FE00010'].BulkDataURI === 'string'
    && ds['7FE00010'].BulkDataURI.startsWith(`${cfg.url}/dicomweb/studies/${cfg.study}/`)),
  'WADO-RS metadata points at Pixel Data with an absolute BulkDataURI');
  const smeta = await client.retrieveSeriesMetadata({
    studyInstanceUID: cfg.study, seriesInstanceUID: cfg.series,
  });
  check(smeta.length === files.length, 'WADO-RS series metadata has every instance');
  const one = files[0];
  const imeta = await client.retrieveInstanceMetadata({
    studyInstanceUID: cfg.study, seriesInstanceUID: cfg.series, sopInstanceUID: one.sop,
  });
  check(imeta.length === 1 && first(imeta[0], '00080018') === one.sop,
    'WADO-RS instance metadata is that one instance');

  // one instance, byte for byte
  const inst = await client.retrieveInstance({
    studyInstanceUID: cfg.study, seriesInstanceUID: cfg.series, sopInstanceUID: one.sop,
  });
  check(inst && Buffer.compare(Buffer.from(inst), one.bytes) === 0,
    'WADO-RS returns the instance byte for byte',
    inst ? `${inst.byteLength} bytes, want ${one.bytes.length}` : 'nothing');

  // the whole series: the same set of files
  const all = await client.retrieveSeries({ studyInstanceUID: cfg.study, seriesInstanceUID: cfg.series });
  const want = files.map((f) => sha(f.bytes)).sort();
  const have = (all || []).map((b) => sha(b)).sort();
  check(JSON.stringify(want) === JSON.stringify(have), 'WADO-RS returns every instance of the series byte for byte',
    `${have.length} parts`);
}

try {
  await main();
} catch (e) {
  const status = e && e.status ? ` (HTTP ${e.status}: ${String(e.response || '').slice(0, 300)})` : '';
  check(false, 'the client library completed every request', `${e && e.message}${status}`);
}
console.log(failed ? `${failed} check(s) failed` : 'every check passed');
process.exit(failed ? 1 : 0);
