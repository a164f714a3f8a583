// radpipe web UI: studies, jobs with live status, models and uploads, over the gateway's
// REST API (/api/v1, proto/openapi.yaml). No framework and no build step: the gateway embeds
// this file. Every value from the server goes into the page as text (DOM nodes, never HTML),
// the Bearer token lives in sessionStorage for this tab only, and the page's CSP allows
// scripts, styles and connections to this origin alone.
'use strict';

const API = '/api/v1';
const PAGE = 25;
const TOKEN_KEY = 'radpipe.token';
const FINAL = new Set(['succeeded', 'failed', 'dead', 'cancelled']);

// --- small helpers -----------------------------------------------------------------------

// h('tag', {attr: value, onclick: fn}, child...): an element; strings become text nodes.
function h(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (k === 'class') e.className = v;
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const k of kids.flat()) {
    if (k === undefined || k === null || k === false) continue;
    e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  }
  return e;
}

function toast(msg, bad) {
  const d = h('div', { class: bad ? 'bad' : '' }, msg);
  document.getElementById('toast').append(d);
  setTimeout(() => d.remove(), bad ? 8000 : 4000);
}

function token() { return sessionStorage.getItem(TOKEN_KEY) || ''; }

class ApiError extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}

// fetch with the token; JSON (or problem+json turned into an ApiError) back.
async function api(path, opts = {}) {
  const headers = Object.assign({ Authorization: 'Bearer ' + token() }, opts.headers || {});
  const r = await fetch(path.startsWith('/') ? path : API + '/' + path,
    Object.assign({}, opts, { headers }));
  if (r.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    route();
    throw new ApiError(401, 'the token was refused: sign in again');
  }
  const ct = r.headers.get('Content-Type') || '';
  const body = ct.includes('json') ? await r.json().catch(() => null) : null;
  if (!r.ok) {
    const detail = body && (body.detail || body.title) ? (body.detail || body.title) : r.statusText;
    throw new ApiError(r.status, `${r.status}: ${detail}`);
  }
  return body;
}

function qs(params) {
  const u = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== '' && v !== undefined && v !== null) u.set(k, v);
  const s = u.toString();
  return s ? '?' + s : '';
}

function fmtDate(d) { return /^\d{8}$/.test(d || '') ? `${d.slice(0, 4)}-${d.slice(4, 6)}-${d.slice(6)}` : (d || ''); }
function fmtTime(t) { return t ? new Date(t).toLocaleString() : ''; }
function fmtBytes(n) {
  if (n === undefined || n === null) return '';
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  for (; n >= 1024 && i < u.length - 1; i++) n /= 1024;
  return `${i ? n.toFixed(1) : n} ${u[i]}`;
}
// PN values come as "Family^Given^Middle^Prefix^Suffix".
function fmtName(pn) { return (pn || '').split('^').filter(Boolean).join(' '); }

function stateCell(state) { return h('span', { class: 'state ' + state }, state); }

function progressCell(p) {
  if (!p || !p.total) return '';
  return h('span', {}, h('progress', { max: p.total, value: p.done || 0 }), ` ${p.done || 0}/${p.total} ${p.unit || ''}`);
}

function pager(total, offset, go) {
  const last = Math.max(0, total - 1);
  return h('div', { class: 'pager' },
    h('button', { type: 'button', disabled: offset <= 0, onclick: () => go(Math.max(0, offset - PAGE)) }, '‹ previous'),
    h('span', { class: 'muted' }, total ? `${offset + 1}–${Math.min(offset + PAGE, total)} of ${total}` : 'nothing found'),
    h('button', { type: 'button', disabled: offset + PAGE > last, onclick: () => go(offset + PAGE) }, 'next ›'));
}

function show(...nodes) {
  const m = document.getElementById('main');
  m.replaceChildren(...nodes);
}

// --- live job status: GET /api/v1/events read with fetch (EventSource cannot send a token) --

const live = { ctl: null, listeners: new Set(), lastId: '', backoff: 1000 };

function setLive(on, why) {
  const e = document.getElementById('live');
  e.className = 'live ' + (on ? 'on' : 'off');
  e.textContent = on ? 'live' : 'offline';
  e.title = why || 'live job status (GET /api/v1/events)';
}

async function liveLoop() {
  while (token()) {
    live.ctl = new AbortController();
    try {
      const headers = { Authorization: 'Bearer ' + token(), Accept: 'text/event-stream' };
      if (live.lastId) headers['Last-Event-ID'] = live.lastId;
      const r = await fetch(API + '/events', { headers, signal: live.ctl.signal });
      if (!r.ok || !r.body) throw new Error(`events: HTTP ${r.status}`);
      setLive(true);
      live.backoff = 1000;
      const rd = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = '';
      for (;;) {
        const { value, done } = await rd.read();
        if (done) break;
        buf += value;
        let cut;
        while ((cut = buf.indexOf('\n\n')) >= 0) {
          dispatch(buf.slice(0, cut));
          buf = buf.slice(cut + 2);
        }
      }
      setLive(false, 'the event stream ended; reconnecting');
    } catch (e) {
      if (live.ctl.signal.aborted) return;
      setLive(false, String(e.message || e));
    }
    await new Promise((res) => setTimeout(res, live.backoff));
    live.backoff = Math.min(live.backoff * 2, 30000);
  }
  setLive(false);
}

function dispatch(block) {
  let id = '', data = '';
  for (const line of block.split('\n')) {
    if (line.startsWith('id:')) id = line.slice(3).trim();
    else if (line.startsWith('data:')) data += line.slice(5).trim();
  }
  if (id) live.lastId = id;
  if (!data) return;
  let ev;
  try { ev = JSON.parse(data); } catch { return; }
  for (const f of live.listeners) f(ev);
}

function stopLive() {
  if (live.ctl) live.ctl.abort();
  live.ctl = null;
  setLive(false);
}

// A view registers one listener; route() clears them.
function onJobEvent(f) { live.listeners.add(f); }

// --- views ---------------------------------------------------------------------------------

function signIn() {
  const input = h('input', { type: 'password', name: 'token', autocomplete: 'off', required: true, size: 48 });
  const form = h('form', {
    class: 'card',
    onsubmit: async (e) => {
      e.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      try {
        await api('studies?limit=1');
        toast('signed in');
        start();
      } catch (err) {
        sessionStorage.removeItem(TOKEN_KEY);
        toast(err.message, true);
      }
    },
  },
  h('h2', {}, 'Sign in'),
  h('p', { class: 'muted' }, 'An API token (api-gateway token create --scopes read,write; the embedded stack writes its admin token to var/admin-token). It is kept in this tab only.'),
  h('label', {}, 'Token', input),
  h('p', {}, h('button', { class: 'primary', type: 'submit' }, 'Sign in')));
  show(form);
  input.focus();
}

async function studiesView(params) {
  const offset = Number(params.get('offset') || 0);
  const f = {
    patient_name: params.get('patient_name') || '',
    patient_id: params.get('patient_id') || '',
    modality: params.get('modality') || '',
    study_date_from: params.get('study_date_from') || '',
    study_date_to: params.get('study_date_to') || '',
  };
  const field = (name, label, attrs = {}) => h('label', {}, label, h('input', Object.assign({ name, value: f[name] }, attrs)));
  const form = h('form', {
    class: 'bar',
    onsubmit: (e) => {
      e.preventDefault();
      const d = new FormData(form);
      for (const k of ['study_date_from', 'study_date_to']) d.set(k, (d.get(k) || '').replaceAll('-', ''));
      location.hash = '#/studies' + qs(Object.fromEntries(d));
    },
  },
  field('patient_name', 'Patient name (* ? wildcards)'), field('patient_id', 'Patient ID'),
  field('modality', 'Modality', { size: 4 }),
  field('study_date_from', 'Date from', { type: 'date', value: fmtDate(f.study_date_from) }),
  field('study_date_to', 'Date to', { type: 'date', value: fmtDate(f.study_date_to) }),
  h('button', { class: 'primary', type: 'submit' }, 'Search'));
  const list = await api('studies' + qs(Object.assign({}, f, { limit: PAGE, offset, sort: '-study_date' })));
  const rows = list.items.map((s) => h('tr', { class: 'click', onclick: () => { location.hash = '#/studies/' + encodeURIComponent(s.study_instance_uid); } },
    h('td', {}, fmtName(s.patient_name)), h('td', {}, s.patient_id || ''), h('td', {}, fmtDate(s.study_date)),
    h('td', {}, s.study_description || ''), h('td', {}, (s.modalities || []).join(', ')),
    h('td', {}, `${s.num_series} / ${s.num_instances}`),
    h('td', {}, s.completed_version ? `v${s.completed_version}` : h('span', { class: 'muted' }, 'receiving'))));
  show(h('h2', {}, 'Studies'), form,
    h('table', {}, h('thead', {}, h('tr', {}, ['Patient', 'Patient ID', 'Date', 'Description', 'Modalities', 'Series / instances', 'Complete'].map((t) => h('th', {}, t)))),
      h('tbody', {}, rows)),
    pager(list.total, offset, (o) => { params.set('offset', o); location.hash = '#/studies?' + params; }));
}

function jobRow(j, withStudy) {
  const tr = h('tr', { 'data-job': j.id });
  const fill = (x) => {
    const actions = [];
    if (x.state === 'failed' || x.state === 'dead' || x.state === 'cancelled')
      actions.push(h('button', { type: 'button', onclick: () => jobAction(x.id, 'retry') }, 'retry'));
    if (!FINAL.has(x.state))
      actions.push(h('button', { type: 'button', onclick: () => jobAction(x.id, 'cancel') }, 'cancel'));
    tr.replaceChildren(
      h('td', {}, h('a', { href: '#/jobs/' + encodeURIComponent(x.id), class: 'uid' }, x.id.slice(0, 8))),
      h('td', {}, x.kind), withStudy ? h('td', { class: 'uid' }, x.study_instance_uid || '') : null,
      h('td', {}, stateCell(x.state)), h('td', {}, progressCell(x.progress)),
      h('td', { class: 'err' }, x.error || ''), h('td', {}, fmtTime(x.updated_at)), h('td', {}, actions));
  };
  fill(j);
  tr.update = (ev) => {
    Object.assign(j, { state: ev.state, progress: ev.progress || (FINAL.has(ev.state) ? null : j.progress), error: ev.error || (ev.state === 'succeeded' ? null : j.error), updated_at: ev.time || j.updated_at });
    fill(j);
  };
  return tr;
}

function jobsTable(jobs, withStudy) {
  const rows = new Map(jobs.map((j) => [j.id, jobRow(j, withStudy)]));
  onJobEvent((ev) => { const r = rows.get(ev.job_id); if (r) r.update(ev); });
  return h('table', {}, h('thead', {}, h('tr', {}, ['Job', 'Kind', withStudy ? 'Study' : null, 'State', 'Progress', 'Error', 'Updated', ''].filter(Boolean).map((t) => h('th', {}, t)))),
    h('tbody', {}, [...rows.values()]));
}

async function jobAction(id, what) {
  try {
    await api(`jobs/${encodeURIComponent(id)}/${what}`, { method: 'POST' });
    toast(`job ${id.slice(0, 8)}: ${what} requested`);
    route();
  } catch (e) { toast(e.message, true); }
}

async function createJob(uid, body) {
  try {
    const j = await api(`studies/${encodeURIComponent(uid)}/jobs`, {
      method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body),
    });
    toast(`${j.kind} job ${j.id.slice(0, 8)} queued`);
    route();
  } catch (e) { toast(e.message, true); }
}

async function studyView(uid) {
  const [s, models] = await Promise.all([
    api('studies/' + encodeURIComponent(uid)),
    api('models').catch(() => ({ models: [] })),
  ]);
  const algo = h('select', { name: 'algorithm' }, ['body', 'otsu'].map((a) => h('option', { value: a }, `algorithm: ${a}`)),
    (models.models || []).map((m) => h('option', { value: 'model:' + m.name }, `model: ${m.name}${m.description ? ' (' + m.description + ')' : ''}`)));
  const segment = () => {
    const v = algo.value;
    createJob(uid, { kind: 'segment', params: v.startsWith('model:') ? { model: v.slice(6) } : { algorithm: v } });
  };
  const series = s.series.map((x) => h('tr', {},
    h('td', {}, x.series_number ?? ''), h('td', {}, x.modality || ''), h('td', {}, x.series_description || ''),
    h('td', {}, x.num_instances), h('td', { class: 'uid' }, x.series_instance_uid)));
  const jobs = await api('jobs' + qs({ study_instance_uid: uid, limit: 100 }));
  show(h('h2', {}, `${fmtName(s.patient_name) || 'Study'} · ${fmtDate(s.study_date)} · ${s.study_description || ''}`),
    h('dl', {}, h('dt', {}, 'Patient ID'), h('dd', {}, s.patient_id || ''),
      h('dt', {}, 'Accession'), h('dd', {}, s.accession_number || ''),
      h('dt', {}, 'Study UID'), h('dd', { class: 'uid' }, s.study_instance_uid),
      h('dt', {}, 'Completed'), h('dd', {}, s.completed_version ? `version ${s.completed_version}` : 'not yet')),
    h('form', { class: 'bar', onsubmit: (e) => { e.preventDefault(); segment(); } }, algo,
      h('button', { class: 'primary', type: 'submit' }, 'Segment'),
      h('button', { type: 'button', onclick: () => createJob(uid, { kind: 'upload', params: {} }) }, 'Archive (upload)'),
      h('button', {
        type: 'button',
        onclick: async () => {
          try {
            await api(`studies/${encodeURIComponent(uid)}/complete`, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: '{"reason":"closed in the web UI"}' });
            toast('study closed: its completion rules run now');
          } catch (e) { toast(e.message, true); }
        },
      }, 'Mark complete')),
    h('h3', {}, `Series (${s.series.length})`),
    h('table', {}, h('thead', {}, h('tr', {}, ['#', 'Modality', 'Description', 'Instances', 'Series UID'].map((t) => h('th', {}, t)))), h('tbody', {}, series)),
    h('h3', {}, `Jobs (${jobs.total})`), jobsTable(jobs.items, false));
}

async function jobsView(params) {
  const offset = Number(params.get('offset') || 0);
  const state = params.get('state') || '';
  const kind = params.get('kind') || '';
  const sel = (name, cur, opts) => h('label', {}, name, h('select', { name, onchange: (e) => { params.set(name, e.target.value); params.delete('offset'); location.hash = '#/jobs?' + params; } },
    opts.map((o) => h('option', { value: o, selected: o === cur }, o || 'any'))));
  const list = await api('jobs' + qs({ state, kind, limit: PAGE, offset }));
  show(h('h2', {}, 'Jobs'),
    h('form', { class: 'bar' }, sel('state', state, ['', 'queued', 'running', 'succeeded', 'failed', 'dead', 'cancelled']),
      sel('kind', kind, ['', 'segment', 'upload'])),
    jobsTable(list.items, true),
    pager(list.total, offset, (o) => { params.set('offset', o); location.hash = '#/jobs?' + params; }));
}

async function download(id, a) {
  try {
    const r = await fetch(`${API}/jobs/${encodeURIComponent(id)}/artifacts/${encodeURIComponent(a.name)}`, { headers: { Authorization: 'Bearer ' + token() } });
    if (!r.ok) throw new Error(`download: HTTP ${r.status}`);
    const url = URL.createObjectURL(await r.blob());
    const link = h('a', { href: url, download: a.name });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  } catch (e) { toast(e.message, true); }
}

async function jobView(id) {
  const j = await api('jobs/' + encodeURIComponent(id));
  const box = h('div');
  const render = () => box.replaceChildren(
    h('dl', {}, h('dt', {}, 'Kind'), h('dd', {}, j.kind),
      h('dt', {}, 'State'), h('dd', {}, stateCell(j.state), ' ', progressCell(j.progress)),
      h('dt', {}, 'Study'), h('dd', {}, h('a', { class: 'uid', href: '#/studies/' + encodeURIComponent(j.study_instance_uid) }, j.study_instance_uid)),
      h('dt', {}, 'Attempts'), h('dd', {}, `${j.attempts} of ${j.max_attempts}`),
      h('dt', {}, 'Created'), h('dd', {}, fmtTime(j.created_at)),
      h('dt', {}, 'Finished'), h('dd', {}, fmtTime(j.finished_at)),
      h('dt', {}, 'Error'), h('dd', { class: 'err' }, j.error || ''),
      h('dt', {}, 'Params'), h('dd', { class: 'uid' }, JSON.stringify(j.params)),
      h('dt', {}, 'Result'), h('dd', { class: 'uid' }, j.result ? JSON.stringify(j.result) : '')),
    h('h3', {}, `Artifacts (${j.artifacts.length})`),
    h('table', {}, h('tbody', {}, j.artifacts.map((a) => h('tr', {},
      h('td', {}, h('button', { type: 'button', onclick: () => download(j.id, a) }, a.name)),
      h('td', {}, fmtBytes(a.size)), h('td', { class: 'muted' }, a.media_type))))));
  render();
  onJobEvent(async (ev) => {
    if (ev.job_id !== j.id) return;
    try { Object.assign(j, await api('jobs/' + encodeURIComponent(id))); render(); } catch { /* next event */ }
  });
  show(h('h2', {}, `Job ${j.id}`), box);
}

async function modelsView() {
  const m = await api('models');
  show(h('h2', {}, 'Models'), h('p', { class: 'muted' }, 'The networks the gpu-segmenters have loaded (RADPIPE_MODELS_DIR).'),
    h('table', {}, h('thead', {}, h('tr', {}, ['Name', 'Version', 'Modality', 'Labels', 'Patch', 'Spacing (mm)', 'Size', 'Loaded by'].map((t) => h('th', {}, t)))),
      h('tbody', {}, (m.models || []).map((x) => h('tr', {},
        h('td', {}, x.name, x.description ? h('div', { class: 'muted' }, x.description) : null), h('td', {}, x.version ?? ''),
        h('td', {}, x.modality || ''), h('td', {}, (x.labels || []).map((l) => l.name || l.meaning || '').filter(Boolean).join(', ')),
        h('td', {}, (x.patch_size || []).join('×')), h('td', {}, (x.spacing_mm || []).join(' × ')),
        h('td', {}, fmtBytes(x.size_bytes)), h('td', {}, x.loaded_by || ''))))));
}

function uploadView() {
  const input = h('input', { type: 'file', multiple: true, accept: '.dcm,.zip,application/dicom,application/zip' });
  const log = h('tbody');
  const go = async (e) => {
    e.preventDefault();
    const files = [...input.files];
    for (const f of files) {
      const zip = /\.zip$/i.test(f.name) || f.type === 'application/zip';
      const row = h('tr', {}, h('td', {}, f.name), h('td', {}, fmtBytes(f.size)), h('td', { class: 'muted' }, 'sending…'));
      log.prepend(row);
      try {
        const r = await api('instances', { method: 'POST', headers: { 'Content-Type': zip ? 'application/zip' : 'application/dicom' }, body: f });
        row.lastChild.textContent = zip ? `stored ${r.stored}, skipped ${r.skipped}` : `stored (study ${r.study_instance_uid})`;
        row.lastChild.className = '';
      } catch (err) {
        row.lastChild.textContent = err.message;
        row.lastChild.className = 'err';
      }
    }
  };
  show(h('h2', {}, 'Upload DICOM'),
    h('form', { class: 'bar', onsubmit: go }, h('label', {}, 'DICOM files or zips', input), h('button', { class: 'primary', type: 'submit' }, 'Upload')),
    h('p', { class: 'muted' }, 'Each file goes to POST /api/v1/instances; the dicom-indexer indexes it and the study appears under Studies.'),
    h('table', {}, log));
}

// --- routing -------------------------------------------------------------------------------

async function route() {
  live.listeners.clear();
  document.getElementById('signout').hidden = !token();
  if (!token()) { stopLive(); signIn(); return; }
  const [path, query] = (location.hash.slice(1) || '/studies').split('?');
  const params = new URLSearchParams(query || '');
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  for (const a of document.querySelectorAll('nav a')) a.classList.toggle('on', a.getAttribute('href') === '#/' + parts[0]);
  try {
    if (parts[0] === 'studies' && parts[1]) await studyView(parts[1]);
    else if (parts[0] === 'jobs' && parts[1]) await jobView(parts[1]);
    else if (parts[0] === 'jobs') await jobsView(params);
    else if (parts[0] === 'models') await modelsView();
    else if (parts[0] === 'upload') uploadView();
    else await studiesView(params);
  } catch (e) {
    show(h('p', { class: 'err' }, e.message));
  }
}

function start() {
  if (!live.ctl && token()) liveLoop();
  route();
}

window.addEventListener('hashchange', route);
document.getElementById('signout').addEventListener('click', () => {
  sessionStorage.removeItem(TOKEN_KEY);
  stopLive();
  route();
});
start();
