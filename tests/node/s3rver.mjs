// s3rver.mjs: runs s3rver (a real S3-protocol server on loopback) for radpipe's tests, with:
//  - a request log: one JSON line per request {"m","path","q","status","bytes","t0","t1"}
//    (--log FILE; t0/t1: arrival and answer in ms),
//    so tests count what reached the server (parts sent, retries);
//  - the three multipart calls s3rver 3.7 lacks, served from its own upload directory
//    (<dir>/<bucket>/._S3rver_uploads/<id>/): AbortMultipartUpload, ListParts,
//    ListMultipartUploads; and UploadPart or CompleteMultipartUpload of an unknown (aborted)
//    upload answers NoSuchUpload as S3 does;
//  - fault injection: --fail-every N answers every Nth PUT/POST with 503 SlowDown before
//    s3rver sees it; --drop-every N breaks the connection of every Nth part upload after
//    its first bytes; --part-delay-ms N holds each part upload that long.
// s3rver's listing continuation tokens use DES: run node with --openssl-legacy-provider.
// Usage: node --openssl-legacy-provider s3rver.mjs --dir DIR [--port 0] [--address 127.0.0.1] [--log FILE]
//          [--buckets a,b] [--service-endpoint localhost] [--key K --cert C] [faults]
// Prints "listening PORT" on stdout once it accepts connections; SIGTERM stops it.
import fs from 'node:fs';
import path from 'node:path';
import S3rver from 's3rver';

const args = {};
for (let i = 2; i < process.argv.length; i += 2) args[process.argv[i].replace(/^--/, '')] = process.argv[i + 1];
const dir = args.dir;
if (!dir) {
  console.error('s3rver.mjs: --dir is required');
  process.exit(2);
}
const failEvery = Number(args['fail-every'] || 0);
const dropEvery = Number(args['drop-every'] || 0);
const partDelay = Number(args['part-delay-ms'] || 0);
const logFd = args.log ? fs.openSync(args.log, 'a') : -1;
let mutating = 0;
let partCount = 0;

function log(rec) {
  rec.t1 = Date.now();
  if (logFd >= 0) fs.writeSync(logFd, JSON.stringify(rec) + '\n');
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const xmlEsc = (s) => String(s).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
const XML = '<?xml version="1.0" encoding="UTF-8"?>\n';

function xmlError(ctx, status, code, msg) {
  ctx.status = status;
  ctx.type = 'application/xml';
  ctx.body = `${XML}<Error><Code>${code}</Code><Message>${xmlEsc(msg)}</Message></Error>`;
}

// Outermost: log every request, inject faults.
async function faults(ctx, next) {
  const q = ctx.querystring;
  const isPart = ctx.method === 'PUT' && 'partNumber' in ctx.query;
  const rec = { m: ctx.method, path: ctx.path, q, status: 0, bytes: Number(ctx.get('content-length') || 0), t0: Date.now() };
  if (failEvery && (ctx.method === 'PUT' || ctx.method === 'POST') && ++mutating % failEvery === 0) {
    ctx.req.resume();
    await new Promise((r) => ctx.req.on('end', r).on('error', r));
    xmlError(ctx, 503, 'SlowDown', 'Please reduce your request rate.');
    rec.status = 503;
    rec.fault = 'slowdown';
    log(rec);
    return;
  }
  if (dropEvery && isPart && ++partCount % dropEvery === 0) {
    await new Promise((r) => {
      ctx.req.once('data', () => ctx.req.socket.destroy());
      ctx.req.socket.once('close', r);
    });
    rec.status = 0;
    rec.fault = 'dropped';
    log(rec);
    ctx.respond = false;
    return;
  }
  if (partDelay && isPart) await sleep(partDelay);
  try {
    await next();
    rec.status = ctx.status;
  } catch (err) {
    rec.status = err.status || 500;
    throw err;
  } finally {
    if (!rec.status) rec.status = ctx.status;
    log(rec);
  }
}

// Abort an upload: its key file goes first (from then on the upload does not exist), then its
// other files; its directory stays. s3rver's putPart makes the directory, then opens the part
// file in it, and node dies (an unhandled stream error) if the directory vanished in between,
// which an abort racing a part upload did (s3rver itself still removes the directory of a
// completed upload; clients complete only once every part is answered).
function dropUpload(udir) {
  fs.rmSync(path.join(udir, 'key'), { force: true });
  let names = [];
  try {
    names = fs.readdirSync(udir);
  } catch {
    return;
  }
  for (const n of names) fs.rmSync(path.join(udir, n), { recursive: true, force: true });
}

// Innermost (after s3rver's virtual-host rewrite): the multipart calls s3rver lacks.
async function multipartExtras(ctx, next) {
  const m = /^\/([^/]+)(?:\/(.*))?$/.exec(ctx.path);
  if (!m) return next();
  const bucket = m[1];
  const key = m[2] ? decodeURIComponent(m[2]) : '';
  const uploads = path.join(dir, bucket, '._S3rver_uploads');
  const uid = ctx.query.uploadId;
  // S3 refuses a part, or the completion, of an upload that was aborted or completed; s3rver
  // would store the part (a part dropped by a stopped client can still arrive after the abort)
  if (key && uid && (ctx.method === 'PUT' || ctx.method === 'POST')) {
    const udir = path.join(uploads, path.basename(uid));
    const gone = () => !fs.existsSync(path.join(udir, 'key'));
    if (gone()) return xmlError(ctx, 404, 'NoSuchUpload', 'The specified upload does not exist.');
    if (ctx.method === 'POST') return next();
    // aborted while s3rver still handled the part (it arrived first): drop the part's files
    // once it is done, as S3 would have refused the part
    try {
      await next();
    } finally {
      if (gone()) dropUpload(udir);
    }
    if (gone()) xmlError(ctx, 404, 'NoSuchUpload', 'The specified upload does not exist.');
    return;
  }
  if (key && uid && (ctx.method === 'DELETE' || ctx.method === 'GET')) {
    const udir = path.join(uploads, path.basename(uid));
    let storedKey;
    try {
      storedKey = fs.readFileSync(path.join(udir, 'key'), 'utf8');
    } catch {
      return xmlError(ctx, 404, 'NoSuchUpload', 'The specified upload does not exist.');
    }
    if (storedKey !== key) return xmlError(ctx, 404, 'NoSuchUpload', 'The upload belongs to another key.');
    if (ctx.method === 'DELETE') {
      dropUpload(udir);
      ctx.status = 204;
      return;
    }
    const marker = Number(ctx.query['part-number-marker'] || 0);
    const max = Number(ctx.query['max-parts'] || 1000);
    // a part whose upload broke off has no .md5 yet: it was never acknowledged
    const nums = fs
      .readdirSync(udir)
      .filter((f) => /^\d+$/.test(f) && fs.existsSync(path.join(udir, `${f}.md5`)))
      .map(Number)
      .filter((n) => n > marker)
      .sort((a, b) => a - b);
    const page = nums.slice(0, max);
    const parts = page.map((n) => {
      const size = fs.statSync(path.join(udir, String(n))).size;
      const md5 = fs.readFileSync(path.join(udir, `${n}.md5`), 'utf8');
      return `<Part><PartNumber>${n}</PartNumber><ETag>"${md5}"</ETag><Size>${size}</Size></Part>`;
    });
    const truncated = nums.length > page.length;
    ctx.type = 'application/xml';
    ctx.body = `${XML}<ListPartsResult><Bucket>${xmlEsc(bucket)}</Bucket><Key>${xmlEsc(key)}</Key><UploadId>${xmlEsc(uid)}</UploadId>` +
      `<IsTruncated>${truncated}</IsTruncated>${truncated ? `<NextPartNumberMarker>${page[page.length - 1]}</NextPartNumberMarker>` : ''}${parts.join('')}</ListPartsResult>`;
    return;
  }
  if (!key && ctx.method === 'GET' && 'uploads' in ctx.query) {
    const prefix = ctx.query.prefix || '';
    let ids = [];
    try {
      ids = fs.readdirSync(uploads);
    } catch {
      /* no uploads yet */
    }
    const list = ids
      .map((id) => {
        try {
          return { id, key: fs.readFileSync(path.join(uploads, id, 'key'), 'utf8') };
        } catch {
          return null;
        }
      })
      .filter((u) => u && u.key.startsWith(prefix))
      .sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : a.id < b.id ? -1 : 1));
    ctx.type = 'application/xml';
    ctx.body = `${XML}<ListMultipartUploadsResult><Bucket>${xmlEsc(bucket)}</Bucket><Prefix>${xmlEsc(prefix)}</Prefix><IsTruncated>false</IsTruncated>` +
      list.map((u) => `<Upload><Key>${xmlEsc(u.key)}</Key><UploadId>${xmlEsc(u.id)}</UploadId></Upload>`).join('') +
      '</ListMultipartUploadsResult>';
    return;
  }
  return next();
}

const opts = {
  address: args.address || '127.0.0.1',
  port: Number(args.port || 0),
  directory: dir,
  silent: true,
  configureBuckets: (args.buckets || '').split(',').filter(Boolean).map((name) => ({ name })),
};
if (args['service-endpoint']) opts.serviceEndpoint = args['service-endpoint'];
if (args.key && args.cert) {
  opts.key = fs.readFileSync(args.key);
  opts.cert = fs.readFileSync(args.cert);
}
const server = new S3rver(opts);
server.middleware.unshift(faults);
server.middleware.splice(server.middleware.length - 1, 0, multipartExtras);
const addr = await server.run();
console.log(`listening ${addr.port}`);
process.on('SIGTERM', () => {
  server.close().finally(() => process.exit(0));
  setTimeout(() => process.exit(0), 2000).unref();
});
