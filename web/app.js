// upscaler web page: upload images, follow their tasks, compare and download the results.
// Plain JS, no dependencies. Every request carries the bearer token once one is known.
'use strict';

(() => {
  const TOKEN_KEY = 'upscaler.token';
  const MAX_ACTIVE = 2; // files uploaded/followed at the same time
  const MAX_BUSY_RETRIES = 20; // automatic retries on 429 queue_full / 503 unavailable
  const MAX_STREAM_RETRIES = 5; // reconnections of a progress stream that ended early
  const ACTIVE = new Set(['uploading', 'queued', 'running', 'fetching']);
  const FINISHED = new Set(['success', 'failed', 'error', 'cancelled']);

  const $ = (sel) => document.querySelector(sel);
  const ui = {
    auth: $('#auth'), authForm: $('#auth-form'), authHelp: $('#auth-help'), token: $('#token'),
    model: $('#model'), modelDesc: $('#model-desc'), outscale: $('#outscale'), format: $('#format'),
    drop: $('#drop-zone'), input: $('#file-input'), status: $('#status'),
    queue: $('#queue'), queueEmpty: $('#queue-empty'), clearDone: $('#clear-done'),
  };

  let token = sessionStorage.getItem(TOKEN_KEY) || '';
  let waitingForToken = false; // a 401 was seen: start no new uploads until a token is given
  let modelsState = 'loading'; // loading | ready | failed | auth
  let models = [];
  const jobs = [];
  let nextId = 1;

  // ---------- small helpers ----------

  function h(tag, attrs = {}, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') e.className = v;
      else if (k === 'text') e.textContent = v;
      else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? '' : v);
    }
    for (const c of children) if (c != null) e.append(c);
    return e;
  }

  function headers(extra = {}) {
    return token ? { ...extra, Authorization: `Bearer ${token}` } : { ...extra };
  }

  function announce(text) {
    // Clear first so that the same text is announced again.
    ui.status.textContent = '';
    requestAnimationFrame(() => { ui.status.textContent = text; });
  }

  function shortId(id) {
    return id ? String(id).slice(0, 8) : '?';
  }

  function formatBytes(n) {
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
    return `${(n / 1024 / 1024).toFixed(1)} MB`;
  }

  function formatScale(x) {
    return String(Math.round(x * 100) / 100);
  }

  // Reads `{"error": {"code", "message"}}`, or makes one up from the status line.
  async function readError(res) {
    let code = `http_${res.status}`;
    let message = `${res.status} ${res.statusText || 'error'}`.trim();
    try {
      const body = await res.json();
      if (body && body.error) {
        code = body.error.code || code;
        message = body.error.message || message;
      }
    } catch (_) { /* not JSON */ }
    return { status: res.status, code, message, retryAfter: retryAfterSeconds(res) };
  }

  function retryAfterSeconds(res) {
    const v = res.headers.get('Retry-After');
    if (!v) return null;
    const n = Number(v);
    if (Number.isFinite(n)) return Math.max(1, Math.ceil(n));
    const t = Date.parse(v);
    return Number.isNaN(t) ? null : Math.max(1, Math.ceil((t - Date.now()) / 1000));
  }

  // ---------- token ----------

  function needToken() {
    const firstTime = ui.auth.hidden;
    waitingForToken = true;
    ui.auth.hidden = false;
    ui.authHelp.textContent = token
      ? 'The server refused this token. Enter the right one; it is kept in this browser tab only.'
      : 'This server requires an access token. It is kept in this browser tab only (session storage) and sent as “Authorization: Bearer …”.';
    if (firstTime) {
      announce('This server requires an access token: enter it in the Access token field.');
      ui.token.focus();
    }
  }

  ui.authForm.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const value = ui.token.value.trim();
    if (!value) { ui.token.focus(); return; }
    token = value;
    sessionStorage.setItem(TOKEN_KEY, token);
    ui.token.value = '';
    waitingForToken = false;
    announce('Token saved for this tab; retrying.');
    if (modelsState !== 'ready') loadModels();
    for (const job of jobs) if (job.state === 'auth' && job.retry) job.retry();
    pump();
  });

  // ---------- models ----------

  async function loadModels() {
    modelsState = 'loading';
    ui.model.disabled = true;
    ui.modelDesc.textContent = 'Loading the model list…';
    let res;
    try {
      res = await fetch('/models', { headers: headers(), cache: 'no-store' });
    } catch (e) {
      return modelsFailed(`Could not reach the server: ${e.message}`);
    }
    if (res.status === 401) {
      modelsState = 'auth';
      ui.modelDesc.textContent = 'The model list needs the access token.';
      needToken();
      return;
    }
    if (!res.ok) return modelsFailed((await readError(res)).message);
    let body;
    try { body = await res.json(); } catch (e) { return modelsFailed('The model list is not valid JSON.'); }
    models = Array.isArray(body.models) ? body.models : [];
    ui.model.replaceChildren(...models.map((m) => h('option', {
      value: m.name,
      text: `${m.name} (×${m.scale})${m.name === body.default ? ' — default' : ''}`,
    })));
    if (models.length === 0) {
      ui.model.append(h('option', { value: '', text: 'No model installed' }));
    } else {
      const def = models.find((m) => m.name === body.default) || models[0];
      ui.model.value = def.name;
    }
    ui.model.disabled = models.length === 0;
    modelsState = 'ready';
    if (token && !ui.auth.hidden) { // the token just given works: fold the form away again
      const hadFocus = ui.auth.contains(document.activeElement);
      ui.auth.hidden = true;
      if (hadFocus) ui.model.focus();
      announce('Token accepted.');
    }
    showModel();
    pump();
  }

  function modelsFailed(message) {
    modelsState = 'failed';
    ui.model.replaceChildren(h('option', { value: '', text: 'Server default' }));
    ui.model.disabled = false;
    ui.modelDesc.replaceChildren(
      `Could not load the model list: ${message} `,
      h('button', { type: 'button', class: 'link', text: 'Retry', onclick: loadModels }),
    );
    announce(`Could not load the model list: ${message}`);
    pump(); // uploads still work, with the server's default model
  }

  function selectedModel() {
    return models.find((m) => m.name === ui.model.value) || null;
  }

  function showModel() {
    const m = selectedModel();
    ui.modelDesc.textContent = m ? (m.description || `${m.architecture}, ×${m.scale}`) : '';
    ui.outscale.placeholder = m ? `×${m.scale} (model’s scale)` : 'model’s scale';
  }
  ui.model.addEventListener('change', showModel);

  // Current options, or a message saying why they are not valid.
  function readOptions() {
    const raw = ui.outscale.value.trim();
    let outscale = null;
    if (raw !== '' || ui.outscale.validity.badInput) {
      outscale = Number(raw);
      if (raw === '' || !Number.isFinite(outscale) || outscale <= 0 || outscale > 16) {
        ui.outscale.setAttribute('aria-invalid', 'true');
        return { error: 'The output scale must be a number above 0 and at most 16 (or empty).' };
      }
    }
    ui.outscale.removeAttribute('aria-invalid');
    const m = selectedModel();
    return {
      model: ui.model.value || null,
      outscale,
      format: ['jpeg', 'webp'].includes(ui.format.value) ? ui.format.value : 'png',
      scale: outscale ?? (m ? m.scale : null),
    };
  }

  // ---------- queue rows ----------

  function addFiles(fileList) {
    const files = Array.from(fileList || []);
    if (files.length === 0) return;
    for (const file of files) {
      const job = makeJob(file);
      jobs.push(job);
      ui.queue.append(job.el.row);
      if (!/\.(png|jpe?g)$/i.test(file.name)) {
        setState(job, 'error', `Not accepted: “${file.name}” must end in .png, .jpg or .jpeg.`);
      }
    }
    updateQueueChrome();
    announce(files.length === 1 ? `${files[0].name} added to the queue.` : `${files.length} images added to the queue.`);
    pump();
  }

  function makeJob(file) {
    const job = {
      id: nextId++, file, name: file.name, url: URL.createObjectURL(file),
      state: 'waiting', opts: null, overwrite: false, taskId: null,
      controller: null, timer: null, busyRetries: 0, resultUrl: null, retry: null,
    };
    const e = job.el = {};
    e.thumb = h('img', { class: 'thumb', alt: '', src: job.url });
    e.title = h('span', { class: 'job-name', text: file.name });
    e.meta = h('span', { class: 'job-meta', text: formatBytes(file.size) });
    e.remove = h('button', {
      type: 'button', class: 'remove', 'aria-label': `Remove ${file.name} from the list`, title: 'Remove',
      text: '×', onclick: () => removeJob(job),
    });
    e.bar = h('progress', { class: 'bar', max: '1', 'aria-label': `Progress of ${file.name}` });
    e.message = h('p', { class: 'message' });
    e.note = h('p', { class: 'note', hidden: true });
    e.actions = h('div', { class: 'actions', hidden: true });
    e.result = h('div', { class: 'result', hidden: true });
    e.row = h('li', { class: 'job', 'data-file-name': file.name, 'data-state': 'waiting' },
      h('div', { class: 'job-head' }, e.thumb, h('div', { class: 'job-title' }, e.title, e.meta), e.remove),
      e.bar, e.message, e.note, e.actions, e.result);
    e.thumb.addEventListener('load', () => {
      job.width = e.thumb.naturalWidth;
      job.height = e.thumb.naturalHeight;
      updateMeta(job);
    });
    setState(job, 'waiting', 'Waiting for its turn to upload.');
    return job;
  }

  function updateMeta(job) {
    const parts = [formatBytes(job.file.size)];
    if (job.width) parts.push(`${job.width}×${job.height}`);
    if (job.opts) {
      parts.push(job.opts.model || 'default model');
      if (job.opts.scale) parts.push(`×${formatScale(job.opts.scale)}`);
      parts.push(job.opts.format.toUpperCase());
    }
    job.el.meta.textContent = parts.join(' · ');
  }

  // `keepActions`: leave the buttons as they are (a progress update under the same Cancel
  // button, which must not lose the keyboard focus at every tile).
  function setState(job, state, message, progress, keepActions) {
    job.state = state;
    job.el.row.dataset.state = state;
    job.el.message.textContent = message;
    const bar = job.el.bar;
    if (progress === undefined) { // indeterminate while working, full or empty otherwise
      if (state === 'success') { bar.max = 1; bar.value = 1; }
      else if (ACTIVE.has(state)) bar.removeAttribute('value');
      else { bar.max = 1; bar.value = 0; }
    } else {
      bar.max = Math.max(1, progress.total);
      bar.value = Math.min(progress.done, bar.max);
    }
    if (!keepActions) setActions(job, []); // callers add the buttons that fit the new state
    updateQueueChrome();
    // A finished or waiting job frees its slot.
    if (!ACTIVE.has(state)) queueMicrotask(pump);
  }

  function setNote(job, text) {
    job.el.note.textContent = text;
    job.el.note.hidden = !text;
  }

  function setActions(job, actions) {
    delete job.el.actions.dataset.cancels;
    job.el.actions.replaceChildren(...actions.map(([label, fn, secondary]) =>
      h('button', { type: 'button', class: secondary ? 'secondary' : '', text: label, onclick: fn })));
    job.el.actions.hidden = actions.length === 0;
  }

  function stopWork(job) {
    if (job.controller) job.controller.abort();
    job.controller = null;
    clearTimeout(job.timer);
    job.timer = null;
  }

  function clearResult(job) {
    if (job.resultUrl) URL.revokeObjectURL(job.resultUrl);
    job.resultUrl = null;
    job.el.result.replaceChildren();
    job.el.result.hidden = true;
  }

  function removeJob(job) {
    stopWork(job);
    clearResult(job);
    URL.revokeObjectURL(job.url);
    job.el.row.remove();
    jobs.splice(jobs.indexOf(job), 1);
    job.state = 'removed';
    updateQueueChrome();
    pump();
  }

  function updateQueueChrome() {
    ui.queueEmpty.hidden = jobs.length > 0;
    ui.clearDone.hidden = !jobs.some((j) => FINISHED.has(j.state));
  }

  ui.clearDone.addEventListener('click', () => {
    for (const job of jobs.filter((j) => FINISHED.has(j.state))) removeJob(job);
    ui.drop.focus();
  });

  // Starts waiting jobs while fewer than MAX_ACTIVE are in flight.
  function pump() {
    if (waitingForToken || modelsState === 'loading' || modelsState === 'auth') return;
    let active = jobs.filter((j) => ACTIVE.has(j.state)).length;
    for (const job of jobs) {
      if (active >= MAX_ACTIVE) break;
      if (job.state !== 'waiting') continue;
      active++;
      upload(job, { overwrite: job.overwrite, freshOptions: !job.opts });
    }
  }

  // Puts a job back in line; pump() starts it when a slot is free.
  // freshOptions: read the form again (after an error the user may have fixed it).
  function requeue(job, { freshOptions = true, overwrite = false } = {}) {
    stopWork(job);
    if (freshOptions) job.opts = null;
    job.overwrite = overwrite;
    setState(job, 'waiting', 'Waiting for its turn to upload.');
  }

  // ---------- upload ----------

  async function upload(job, { overwrite, freshOptions }) {
    if (job.state === 'removed') return;
    stopWork(job);
    clearResult(job);
    setNote(job, '');
    if (freshOptions || !job.opts) {
      const opts = readOptions();
      if (opts.error) {
        setState(job, 'error', opts.error);
        setActions(job, [['Retry', () => requeue(job)]]);
        return;
      }
      job.opts = opts;
    }
    updateMeta(job);
    const { model, outscale, format } = job.opts;
    // The server reads the options before the image: they go first.
    const form = new FormData();
    if (model) form.append('model', model);
    if (outscale != null) form.append('outscale', String(outscale));
    form.append('format', format);
    if (overwrite) form.append('overwrite', 'true');
    form.append('image', job.file, job.name);

    const controller = job.controller = new AbortController();
    setState(job, 'uploading', overwrite ? 'Uploading (overwriting the stored result)…' : 'Uploading…');
    let res;
    try {
      res = await fetch('/upscale', { method: 'POST', headers: headers(), body: form, signal: controller.signal });
    } catch (e) {
      if (controller.signal.aborted) return;
      setState(job, 'error', `Upload failed, the server could not be reached: ${e.message}`);
      setActions(job, [['Retry', () => upload(job, { overwrite, freshOptions: false })]]);
      return;
    }
    if (controller.signal.aborted) return;
    const retryUpload = () => upload(job, { overwrite, freshOptions: false });

    if (res.ok) {
      let body;
      try { body = await res.json(); } catch (e) { body = {}; }
      job.busyRetries = 0;
      job.taskId = body.task_id || null;
      if (body.outcome === 'already_processed') {
        setState(job, 'choice',
          `Already processed from the same bytes and options (task ${shortId(job.taskId)}).`);
        setActions(job, [
          ['Show stored result', () => showStored(job)],
          ['Process again (overwrite)', () => upload(job, { overwrite: true, freshOptions: false }), true],
        ]);
        announce(`${job.name}: already processed. Show the stored result or process it again.`);
        return;
      }
      if (body.outcome === 'in_progress') {
        setNote(job, `Being processed by an earlier upload (task ${shortId(job.taskId)}): following it.`);
      }
      if (!job.taskId) {
        setState(job, 'error', 'The server accepted the upload but gave no task id.');
        return;
      }
      follow(job, job.taskId, 0);
      return;
    }

    const err = await readError(res);
    if (err.status === 401) {
      setState(job, 'auth', 'The server needs an access token: enter it above and this upload starts again.');
      job.retry = retryUpload;
      setActions(job, [['Retry', retryUpload]]);
      needToken();
    } else if (err.status === 409) {
      setState(job, 'choice',
        `A different image named “${job.name}” is already stored (other bytes or options).`);
      setNote(job, `Server: ${err.message}`);
      setActions(job, [
        ['Overwrite', () => upload(job, { overwrite: true, freshOptions: false })],
        ['Show stored result', () => showStored(job,
          'This is the result stored for the other image with the same name.'), true],
      ]);
      announce(`${job.name}: another image with this name is stored. Overwrite it or show it.`);
    } else if ((err.status === 429 || err.status === 503) && job.busyRetries < MAX_BUSY_RETRIES) {
      job.busyRetries++;
      const wait = err.retryAfter || 5;
      setState(job, 'busy', `${err.message} — the server is busy; trying again in ${wait} s.`);
      setActions(job, [['Retry now', retryUpload]]);
      job.timer = setTimeout(() => { job.timer = null; requeue(job, { freshOptions: false, overwrite }); }, wait * 1000);
    } else {
      setState(job, 'error', `Refused (${err.code}): ${err.message}`);
      setActions(job, [['Retry', () => requeue(job)]]);
      announce(`${job.name}: ${err.message}`);
    }
  }

  // ---------- progress (Server-Sent Events over fetch) ----------

  // Incremental text/event-stream parser: feed it decoded text in any chunks, it calls
  // onEvent({event, data}) for each complete frame. Handles \n, \r\n and \r line endings,
  // even when a \r\n is split across chunks, and ignores `:` comment (keep-alive) lines.
  function sseParser(onEvent) {
    let buf = '';
    let event = '';
    let data = [];
    function line(l) {
      if (l === '') {
        if (data.length) onEvent({ event: event || 'message', data: data.join('\n') });
        event = '';
        data = [];
        return;
      }
      if (l[0] === ':') return;
      const i = l.indexOf(':');
      const field = i < 0 ? l : l.slice(0, i);
      let value = i < 0 ? '' : l.slice(i + 1);
      if (value[0] === ' ') value = value.slice(1);
      if (field === 'event') event = value;
      else if (field === 'data') data.push(value);
    }
    return {
      push(text) {
        buf += text;
        const re = /\r\n|\r|\n/g;
        let start = 0;
        let m;
        while ((m = re.exec(buf))) {
          if (m[0] === '\r' && m.index === buf.length - 1) break; // maybe half of a \r\n
          line(buf.slice(start, m.index));
          start = re.lastIndex;
        }
        buf = buf.slice(start);
      },
      end() { // the stream closed: a last frame without its blank line still counts
        if (buf.endsWith('\r')) buf = buf.slice(0, -1);
        if (buf) line(buf);
        line('');
        buf = '';
      },
    };
  }
  window.upscalerSseParser = sseParser; // exposed for tests

  async function follow(job, taskId, failures) {
    if (job.state === 'removed') return;
    stopWork(job);
    const controller = job.controller = new AbortController();
    if (failures === 0) setState(job, 'queued', `Uploaded; asking for the state of task ${shortId(taskId)}…`);
    const retryFollow = () => follow(job, taskId, 0);
    let res;
    try {
      res = await fetch(`/tasks/${encodeURIComponent(taskId)}/events`, {
        headers: headers({ Accept: 'text/event-stream' }), cache: 'no-store', signal: controller.signal,
      });
    } catch (e) {
      if (!controller.signal.aborted) streamLost(job, taskId, failures, e.message);
      return;
    }
    if (controller.signal.aborted) return;
    if (!res.ok) {
      const err = await readError(res);
      if (err.status === 401) {
        setState(job, 'auth', 'The server needs an access token to show progress: enter it above.');
        job.retry = retryFollow;
        setActions(job, [['Retry', retryFollow]]);
        needToken();
      } else if (err.status === 404) {
        setState(job, 'error', `Task ${shortId(taskId)} is not known to the server (${err.message}).`);
        setActions(job, [['Upload again', () => requeue(job)]]);
      } else if ((err.status === 503 || err.status === 429) && failures < MAX_STREAM_RETRIES) {
        streamLost(job, taskId, failures, err.message, err.retryAfter);
      } else {
        setState(job, 'error', `Could not follow task ${shortId(taskId)} (${err.code}): ${err.message}`);
        setActions(job, [['Retry', retryFollow]]);
      }
      return;
    }

    let finished = false;
    const parser = sseParser(({ event, data }) => {
      if (finished || (event !== 'task' && event !== 'message')) return;
      let task;
      try { task = JSON.parse(data); } catch (_) { return; }
      failures = 0;
      finished = applyTask(job, task);
    });
    try {
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      while (!finished) {
        const { value, done } = await reader.read();
        if (done) { parser.push(decoder.decode()); parser.end(); break; }
        parser.push(decoder.decode(value, { stream: true }));
      }
      if (finished) reader.cancel().catch(() => {});
    } catch (e) {
      if (controller.signal.aborted) return;
      if (!finished) return streamLost(job, taskId, failures, e.message);
    }
    if (controller.signal.aborted || job.controller !== controller) return;
    if (!finished) streamLost(job, taskId, failures, 'the progress stream ended early');
  }

  function streamLost(job, taskId, failures, why, wait) {
    const retryFollow = () => follow(job, taskId, 0);
    if (failures >= MAX_STREAM_RETRIES) {
      setState(job, 'error', `Lost track of task ${shortId(taskId)}: ${why}.`);
      setActions(job, [['Retry', retryFollow]]);
      return;
    }
    const delay = (wait || Math.min(2 ** failures, 10)) * 1000;
    job.el.message.textContent = `Reconnecting to the progress stream (${why})…`;
    job.timer = setTimeout(() => follow(job, taskId, failures + 1), delay);
  }

  // A Cancel button for a task that waits or runs, kept across its progress updates.
  function showWorking(job, taskId, state, message, progress) {
    const offered = job.el.actions.dataset.cancels === taskId;
    setState(job, state, message, progress, offered);
    if (!offered && !job.cancelling) {
      setActions(job, [['Cancel', () => cancelTask(job, taskId), true]]);
      job.el.actions.dataset.cancels = taskId;
    }
  }

  // DELETE /tasks/{id}: the task leaves the queue, or stops part-way through its tile.
  async function cancelTask(job, taskId) {
    job.cancelling = true;
    setActions(job, []);
    job.el.message.textContent = `Cancelling task ${shortId(taskId)}…`;
    let res;
    try {
      res = await fetch(`/tasks/${encodeURIComponent(taskId)}`, {
        method: 'DELETE', headers: headers(), cache: 'no-store',
      });
    } catch (e) {
      job.cancelling = false;
      if (job.state === 'removed' || FINISHED.has(job.state)) return;
      job.el.message.textContent = `Could not cancel: ${e.message}`;
      setActions(job, [['Cancel', () => cancelTask(job, taskId), true]]);
      return;
    }
    job.cancelling = false;
    if (job.state === 'removed') return;
    if (res.ok) {
      const task = await res.json().catch(() => null);
      // CANCELLED ends the row; a task whose instance has not stopped it yet keeps being
      // followed, and its events end it.
      if (task && applyTask(job, task)) return;
    } else {
      const err = await readError(res);
      if (err.status === 401) {
        needToken();
      } else if (err.status !== 409) { // 409: it has just ended; its events show how
        announce(`${job.name}: could not cancel (${err.code}): ${err.message}`);
      }
    }
    if (!FINISHED.has(job.state) && job.state !== 'fetching') {
      setActions(job, [['Cancel', () => cancelTask(job, taskId), true]]);
      job.el.actions.dataset.cancels = taskId;
    }
  }

  // Shows one task state; true once the task is over.
  function applyTask(job, task) {
    const taskId = task.task_id || job.taskId;
    const id = shortId(taskId);
    const state = task.state || task.status;
    if (job.state === 'cancelled') return true; // already shown (by the answer or an event)
    if (state === 'PENDING') {
      const place = task.queue_position ? ` (number ${task.queue_position} in the queue)` : '';
      showWorking(job, taskId, 'queued', `Queued on the server (task ${id})${place}; waiting for a worker.`);
    } else if (state === 'STARTED') {
      const p = task.progress || { done: 0, total: 0 };
      const stopping = task.cancel_requested ? ' Stopping…' : '';
      if (p.total > 0) {
        showWorking(job, taskId, 'running', `Running: ${p.done} / ${p.total} tiles done (task ${id}).${stopping}`, p);
      } else {
        showWorking(job, taskId, 'running', `Running (task ${id})…${stopping}`);
      }
    } else if (state === 'SUCCESS') {
      stopWork(job);
      fetchResult(job, task);
      return true;
    } else if (state === 'FAILURE') {
      stopWork(job);
      setState(job, 'failed', `Failed (task ${id}): ${task.error || 'no reason given'}`);
      setActions(job, [['Try again', () => upload(job, { overwrite: false, freshOptions: true })]]);
      announce(`${job.name} failed: ${task.error || 'no reason given'}`);
      return true;
    } else if (state === 'CANCELLED') {
      stopWork(job);
      setState(job, 'cancelled', `Cancelled (task ${id}); nothing was stored.`);
      setActions(job, [['Upload again', () => upload(job, { overwrite: false, freshOptions: true })]]);
      announce(`${job.name} was cancelled`);
      return true;
    }
    return false;
  }

  // ---------- result ----------

  // The result stored under this name, without a task (already processed, or name taken).
  async function showStored(job, note) {
    await fetchResult(job, null);
    if (job.state === 'success' && note) setNote(job, note);
  }

  async function fetchResult(job, task) {
    if (job.state === 'removed') return;
    stopWork(job);
    const controller = job.controller = new AbortController();
    setState(job, 'fetching', 'Downloading the result…');
    const retry = () => fetchResult(job, task);
    const name = (task && task.file_name) || job.name;
    let res;
    try {
      res = await fetch(`/processed/${encodeURIComponent(name)}`, {
        headers: headers(), cache: 'no-store', signal: controller.signal,
      });
    } catch (e) {
      if (controller.signal.aborted) return;
      setState(job, 'error', `Could not download the result: ${e.message}`);
      setActions(job, [['Retry', retry]]);
      return;
    }
    if (controller.signal.aborted) return;
    if (!res.ok) {
      const err = await readError(res);
      if (err.status === 401) {
        setState(job, 'auth', 'The server needs an access token to send the result: enter it above.');
        job.retry = retry;
        setActions(job, [['Retry', retry]]);
        needToken();
      } else {
        setState(job, 'error', `Could not download the result (${err.code}): ${err.message}`);
        setActions(job, [['Retry', retry]]);
      }
      return;
    }
    let blob;
    try { blob = await res.blob(); } catch (e) {
      if (controller.signal.aborted) return;
      setState(job, 'error', `The result download broke off: ${e.message}`);
      setActions(job, [['Retry', retry]]);
      return;
    }
    job.controller = null;
    clearResult(job);
    job.resultUrl = URL.createObjectURL(blob);
    buildComparison(job, blob);
    let msg = task ? 'Done' : 'Stored result';
    if (task && task.input && task.output) {
      msg += `: ${task.input.width}×${task.input.height} → ${task.output.width}×${task.output.height}`;
    }
    if (task && task.model) msg += ` with ${task.model}`;
    if (task && task.started_at && task.finished_at) {
      const s = (Date.parse(task.finished_at) - Date.parse(task.started_at)) / 1000;
      if (Number.isFinite(s) && s >= 0) msg += ` in ${s.toFixed(1)} s`;
    }
    setState(job, 'success', `${msg}. Drag the slider to compare.`);
    announce(`${job.name}: ${task ? 'done' : 'stored result shown'}.`);
  }

  function stem(name) {
    const i = name.lastIndexOf('.');
    return i > 0 ? name.slice(0, i) : name;
  }

  function downloadName(job, blob, scale) {
    const ext = { 'image/jpeg': 'jpg', 'image/webp': 'webp' }[blob.type] || 'png';
    return `${stem(job.name)}${scale ? `_x${formatScale(scale)}` : '_upscaled'}.${ext}`;
  }

  function buildComparison(job, blob) {
    const name = job.name;
    const before = h('img', { class: 'before', alt: `Original: ${name}`, src: job.url, draggable: 'false' });
    const after = h('img', { class: 'after', alt: `Upscaled: ${name}`, src: job.resultUrl, draggable: 'false' });
    const fig = h('div', { class: 'compare' },
      before, after,
      h('div', { class: 'divider', 'aria-hidden': 'true' }),
      h('span', { class: 'tag tag-before', 'aria-hidden': 'true', text: 'Before' }),
      h('span', { class: 'tag tag-after', 'aria-hidden': 'true', text: 'After' }));
    const range = h('input', {
      type: 'range', class: 'slider', min: '0', max: '100', step: '1', value: '50',
      'aria-label': `Before/after split for ${name}: how much of the original is shown, from the left`,
    });
    const setSplit = (v) => {
      range.value = String(v);
      fig.style.setProperty('--split', `${range.value}%`);
      range.setAttribute('aria-valuetext', `${range.value}% original, ${100 - range.value}% upscaled`);
    };
    setSplit(50);
    range.addEventListener('input', () => setSplit(range.value));

    // Dragging on the picture moves the split too (the range stays the keyboard control).
    let dragging = false;
    const fromPointer = (ev) => {
      const r = fig.getBoundingClientRect();
      setSplit(Math.round(Math.min(1, Math.max(0, (ev.clientX - r.left) / r.width)) * 100));
    };
    fig.addEventListener('pointerdown', (ev) => {
      dragging = true;
      fig.setPointerCapture(ev.pointerId);
      fromPointer(ev);
    });
    fig.addEventListener('pointermove', (ev) => { if (dragging) fromPointer(ev); });
    const stopDrag = () => { dragging = false; };
    fig.addEventListener('pointerup', stopDrag);
    fig.addEventListener('pointercancel', stopDrag);

    const scaleGuess = job.opts ? job.opts.scale : null;
    const link = h('a', {
      class: 'download button', href: job.resultUrl, download: downloadName(job, blob, scaleGuess),
    });
    const size = h('span', { class: 'hint' });
    const describe = () => {
      link.textContent = `Download ${link.getAttribute('download')}`;
      const dims = after.naturalWidth ? `${after.naturalWidth}×${after.naturalHeight}, ` : '';
      size.textContent = `${dims}${formatBytes(blob.size)}`;
    };
    const onLoad = () => {
      if (before.naturalWidth) {
        job.el.result.style.setProperty('--ar', String(before.naturalWidth / before.naturalHeight));
      }
      if (after.naturalWidth) { // never shown larger than the result's own pixels
        job.el.result.style.setProperty('--result-w', `${Math.max(after.naturalWidth, 320)}px`);
      }
      if (before.naturalWidth && after.naturalWidth) {
        link.download = downloadName(job, blob, after.naturalWidth / before.naturalWidth);
      }
      describe();
    };
    before.addEventListener('load', onLoad);
    after.addEventListener('load', onLoad);
    after.addEventListener('error', () => { size.textContent = 'The result could not be displayed.'; });
    describe();
    if (job.width) job.el.result.style.setProperty('--ar', String(job.width / job.height));

    job.el.result.replaceChildren(
      fig,
      h('div', { class: 'slider-row' }, range),
      h('div', { class: 'result-foot' }, link, size));
    job.el.result.hidden = false;
  }

  // ---------- drop zone and picker ----------

  ui.drop.addEventListener('click', () => ui.input.click());
  ui.drop.addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' || ev.key === ' ') {
      ev.preventDefault();
      ui.input.click();
    }
  });
  ui.input.addEventListener('change', () => {
    addFiles(ui.input.files);
    ui.input.value = ''; // choosing the same file again fires change again
  });

  let dragDepth = 0;
  ui.drop.addEventListener('dragenter', (ev) => {
    ev.preventDefault();
    dragDepth++;
    ui.drop.classList.add('dragging');
  });
  ui.drop.addEventListener('dragleave', () => {
    if (--dragDepth <= 0) { dragDepth = 0; ui.drop.classList.remove('dragging'); }
  });
  ui.drop.addEventListener('dragover', (ev) => {
    ev.preventDefault();
    ev.dataTransfer.dropEffect = 'copy';
  });
  ui.drop.addEventListener('drop', (ev) => {
    ev.preventDefault();
    dragDepth = 0;
    ui.drop.classList.remove('dragging');
    addFiles(ev.dataTransfer.files);
  });
  // A file dropped next to the zone must not make the browser navigate away.
  window.addEventListener('dragover', (ev) => ev.preventDefault());
  window.addEventListener('drop', (ev) => ev.preventDefault());

  window.addEventListener('beforeunload', (ev) => {
    if (jobs.some((j) => j.state === 'uploading')) ev.preventDefault();
  });

  loadModels();
})();
