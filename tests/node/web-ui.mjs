// web-ui.mjs CONFIG.json: drives the api-gateway's web UI (/ui/) in jsdom against a running
// stack, the way a user would: the page and its script and style come from the gateway; sign
// in with a token; the studies list shows the study; the patient ID filter narrows it; the
// study page lists its series; "Segment" (otsu) queues a job whose row turns final through the
// live event stream alone (GET /api/v1/events read with fetch); the job page lists its
// artifacts; the models page renders; sign out returns to the sign-in form.
// CONFIG: {"url", "token", "study", "patient_id"}. Prints "every check passed" or exits 1.
// Node's fetch, AbortController and TextDecoderStream stand in for the browser's (jsdom has
// no fetch), with URLs resolved against the page as a browser does.
import fs from 'node:fs';
import { JSDOM, VirtualConsole } from 'jsdom';

const cfg = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const errors = [];
const vc = new VirtualConsole();
vc.on('jsdomError', (e) => errors.push(String(e.stack || e)));
vc.on('error', (e) => errors.push(String(e)));

function fail(msg) {
  console.error(`web-ui: ${msg}`);
  if (errors.length) console.error(`page errors:\n${errors.join('\n')}`);
  process.exit(1);
}

const dom = await JSDOM.fromURL(`${cfg.url}/ui/`, {
  runScripts: 'dangerously',
  resources: 'usable',
  pretendToBeVisual: true,
  virtualConsole: vc,
  beforeParse(w) {
    w.fetch = (u, o) => fetch(new URL(String(u), w.location.href), o);
    w.AbortController = AbortController;
    w.TextDecoderStream = TextDecoderStream;
  },
});
const w = dom.window;
const doc = w.document;

async function until(what, f, ms = 20000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = f();
    if (v) return v;
    if (errors.length) fail(`page error while waiting for ${what}`);
    if (Date.now() > end) fail(`timed out waiting for ${what}; page: ${doc.getElementById('main')?.textContent.slice(0, 400)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}
const text = (sel) => [...doc.querySelectorAll(sel)].map((e) => e.textContent);

// the page and its script and style load from the gateway
await until('app.js to run', () => doc.querySelector('form.card input[name=token]'));
const css = [...doc.styleSheets].some((s) => s.cssRules.length > 0);
if (!css) fail('app.css did not load');

// a wrong token is refused, the right one signs in
const input = doc.querySelector('form.card input[name=token]');
input.value = 'rpt_wrong_token';
doc.querySelector('form.card').requestSubmit();
await until('a refusal', () => text('#toast div').some((t) => t.includes('refused')));
if (w.sessionStorage.getItem('radpipe.token')) fail('a refused token was kept');
doc.querySelector('form.card input[name=token]').value = cfg.token;
doc.querySelector('form.card').requestSubmit();
await until('the studies list', () => text('main tbody tr').some((t) => t.includes(cfg.patient_id)));
await until('the live event stream', () => doc.getElementById('live').textContent === 'live');

// the patient ID filter
const form = doc.querySelector('main form.bar');
form.querySelector('input[name=patient_id]').value = cfg.patient_id;
form.requestSubmit();
await until('the filtered list', () => w.location.hash.includes('patient_id=') &&
  text('main tbody tr').length >= 1 && text('main tbody tr').every((t) => t.includes(cfg.patient_id)));
form.querySelector('input[name=patient_id]').value = 'no-such-patient-xyz';
form.requestSubmit();
await until('an empty list', () => text('.pager span').includes('nothing found'));

// the study page, then a segment job that turns final through the event stream
w.location.hash = `#/studies/${encodeURIComponent(cfg.study)}`;
await until('the series table', () => text('main h3').some((t) => t.startsWith('Series (')) && text('main tbody tr').length >= 1);
const uidShown = text('dd.uid').includes(cfg.study);
if (!uidShown) fail('the study page does not show the study UID');
const sel = doc.querySelector('main select[name=algorithm]');
sel.value = 'otsu';
sel.closest('form').requestSubmit();
await until('the queued job', () => text('#toast div').some((t) => /segment job \w+ queued/.test(t)));
const row = await until('the job row', () => doc.querySelector('main tr[data-job]'));
const job = row.getAttribute('data-job');
const jobsFetched = [];
const realFetch = w.fetch;
w.fetch = (u, o) => { jobsFetched.push(String(u)); return realFetch(u, o); };
const final = await until('the job to end (live)', () => {
  const r = doc.querySelector(`main tr[data-job="${job}"] .state`);
  return r && ['succeeded', 'failed', 'dead'].includes(r.textContent) && r.textContent;
}, 180000);
w.fetch = realFetch;
if (jobsFetched.some((u) => u.includes('/jobs'))) fail(`the row was refreshed by polling, not by events: ${jobsFetched}`);
if (final !== 'succeeded') fail(`the segment job ended ${final}: ${doc.querySelector(`main tr[data-job="${job}"]`).textContent}`);

// the job page and its artifacts
w.location.hash = `#/jobs/${job}`;
await until('the job page', () => text('main h3').some((t) => t.startsWith('Artifacts (')));
const arts = text('main tbody tr button');
if (!arts.some((a) => a.endsWith('.nii.gz')) || !arts.some((a) => a.endsWith('.dcm')))
  fail(`the job page lists no NIfTI and SEG: ${arts}`);

// the jobs list (filtered) and the models page
w.location.hash = '#/jobs?state=succeeded';
await until('the jobs list', () => doc.querySelector(`main tr[data-job="${job}"]`));
w.location.hash = '#/models';
await until('the models page', () => text('main h2').includes('Models') && doc.querySelector('main table'));

// sign out
doc.getElementById('signout').click();
await until('the sign-in form', () => doc.querySelector('form.card input[name=token]'));
if (w.sessionStorage.getItem('radpipe.token')) fail('the token outlived sign-out');
if (errors.length) fail('page errors');
console.log(`web-ui: job ${job} ${final} with ${arts.length} artifacts`);
console.log('every check passed');
w.close();
process.exit(0);
