// s3rver-selftest.mjs: checks tests/node/s3rver.mjs itself, the S3 server radpipe's tests
// talk to, where a flaw would fail unrelated tests at random. Today one case: aborting a
// multipart upload while its parts are still arriving (what a stopped storage-uploader job
// leaves behind, then its test aborts the upload). s3rver 3.7's putPart makes the upload's
// directory and then opens the part file in it; when the abort removed that directory in
// between, node died of an unhandled stream error and every later request of the test failed.
// Runs ROUNDS (default 200) rounds of: create an upload, send 8 parts, abort it after 0-4 ms;
// then checks the server still answers, each aborted upload is gone for ListParts, UploadPart
// and CompleteMultipartUpload (404 NoSuchUpload) and no upload is left holding a key.
// Prints "ok"/"FAIL" lines; exits 1 on any failure.
// Usage: node s3rver-selftest.mjs [ROUNDS]
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const rounds = Number(process.argv[2] || 200);
const here = path.dirname(fileURLToPath(import.meta.url));
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 's3rver-selftest-'));
const data = path.join(tmp, 'data');
fs.mkdirSync(data);
let failed = 0;
const ok = (m) => console.log(`ok   ${m}`);
const bad = (m) => {
  console.log(`FAIL ${m}`);
  failed++;
};

const server = spawn(
  process.execPath,
  ['--openssl-legacy-provider', path.join(here, 's3rver.mjs'), '--dir', data, '--port', '0', '--buckets', 'bkt'],
  { stdio: ['ignore', 'pipe', 'pipe'] },
);
let out = '';
server.stdout.on('data', (c) => (out += c));
server.stderr.on('data', (c) => (out += c));
const port = await new Promise((resolve) => {
  const t = setInterval(() => {
    const m = /listening (\d+)/.exec(out);
    if (m || server.exitCode !== null) {
      clearInterval(t);
      resolve(m ? Number(m[1]) : 0);
    }
  }, 50);
});
function finish() {
  server.kill('SIGTERM');
  fs.rmSync(tmp, { recursive: true, force: true });
  console.log(failed ? `s3rver-selftest: ${failed} check(s) failed` : 's3rver-selftest: all checks passed');
  process.exit(failed ? 1 : 0);
}
if (!port) {
  bad(`s3rver.mjs did not start: ${out}`);
  finish();
}

// s3rver accepts requests without credentials; the answer is [status, body] or [0, error]
const agent = new http.Agent({ keepAlive: true, maxSockets: 16 });
function req(method, p, body) {
  return new Promise((resolve) => {
    const r = http.request(
      { host: '127.0.0.1', port, method, path: p, agent, headers: { 'content-length': body ? body.length : 0 } },
      (res) => {
        let d = '';
        res.on('data', (c) => (d += c));
        res.on('end', () => resolve([res.statusCode, d]));
      },
    );
    r.on('error', (e) => resolve([0, String(e)]));
    r.end(body);
  });
}

const part = Buffer.alloc(256 * 1024, 7);
const aborted = [];
let refused = 0;
for (let i = 0; i < rounds && !refused; i++) {
  const key = `race/${i}.bin`;
  const [st, d] = await req('POST', `/bkt/${key}?uploads`);
  const id = /<UploadId>([^<]+)</.exec(d)?.[1];
  if (!id) {
    bad(`round ${i}: CreateMultipartUpload answered ${st}: ${d.slice(0, 200)}`);
    refused = 1;
    break;
  }
  const parts = [];
  for (let n = 1; n <= 8; n++) parts.push(req('PUT', `/bkt/${key}?partNumber=${n}&uploadId=${id}`, part));
  await new Promise((r) => setTimeout(r, i % 5));
  const [ast] = await req('DELETE', `/bkt/${key}?uploadId=${id}`);
  const got = await Promise.all(parts);
  if (ast !== 204 || got.some(([s]) => s === 0)) {
    bad(`round ${i}: abort answered ${ast}, parts ${got.map(([s]) => s).join(',')}: ${(got.find(([s]) => s === 0) || [0, ''])[1]}`);
    refused = 1;
  }
  aborted.push([key, id]);
}
if (!refused) ok(`${rounds} uploads aborted while their parts arrived: every request answered`);

const [hst] = await req('GET', '/bkt?list-type=2');
if (hst === 200) ok('the server still answers after the races');
else bad(`the server no longer answers (${hst}); its output:\n${out}`);

let wrong = 0;
for (const [key, id] of aborted.slice(0, 50)) {
  const q = `/bkt/${key}?uploadId=${id}`;
  const answers = [
    await req('GET', q),
    await req('PUT', `/bkt/${key}?partNumber=9&uploadId=${id}`, part),
    await req('POST', q, Buffer.from('<CompleteMultipartUpload></CompleteMultipartUpload>')),
  ];
  for (const [s, d] of answers) if (s !== 404 || !d.includes('NoSuchUpload')) wrong++;
}
if (!wrong) ok('aborted uploads answer NoSuchUpload to ListParts, UploadPart and CompleteMultipartUpload');
else bad(`${wrong} answers to aborted uploads were not 404 NoSuchUpload`);

const [lst, ld] = await req('GET', '/bkt?uploads');
const area = path.join(data, 'bkt', '._S3rver_uploads');
const withKey = fs.existsSync(area) ? fs.readdirSync(area).filter((u) => fs.existsSync(path.join(area, u, 'key'))) : [];
if (lst === 200 && !ld.includes('<Upload>') && withKey.length === 0) ok('no upload is left');
else bad(`uploads left: ListMultipartUploads ${lst} ${ld.slice(0, 300)}; with a key file: ${withKey.length}`);
finish();
