// The review desk: batch view (keyboard first), "more like this", status and export; the slide view is slide.js.
// Every answer is sent when it is given; the server writes it into the batch's labels.csv.

import { ApiError, enc, get, post } from "./api.js";
import { SlideView } from "./slide.js";

const $ = (id) => document.getElementById(id);

const state = {
  project: null,
  view: "batch",
  batch: null,        // the batch as the server described it
  order: [],          // patch ids in the order shown
  labels: {},         // patch id -> label (as ingest reads it)
  current: 0,         // index into order
  undo: [],           // [[patch id, label before], ...] per action
  zoom: 3,
  busy: false,
  pending: 0,         // answers sent and not yet confirmed by the server
  queue: Promise.resolve(),
  similar: null,      // {from, patches, selected:Set}
};
window.deskState = state; // read by the browser tests and the benchmark (no secrets in it)

let slideView = null;

function say(text, kind = "info") {
  const box = $("message");
  box.textContent = text;
  box.className = kind;
  box.hidden = !text;
}

function shown(label) {
  if (label == null) return "";
  return label.startsWith("not:") ? `not ${label.slice(4)}` : label;
}

function percent(p) {
  return p == null ? "" : `${Math.round(p * 100)}%`;
}

// ---- loading ---------------------------------------------------------------------------------------------

async function loadProject() {
  state.project = await get("/api/project");
  $("project").textContent = state.project.project;
  $("random").hidden = !state.project.random_weights;
  $("slide-tab").hidden = !state.project.slides.some((s) => s.kind === "slide");
  showWarmup(state.project.warmup);
  showAhead(state.project.ahead);
  showPass(state.project.pass);
}

function showPass(pass) {
  // A pooled round's full pass, run after the batch is written (wsi_il/fullpass.py); the review goes on meanwhile.
  let text = "";
  if (pass && pass.state === "running") text = "updating every patch's predictions (you can go on) …";
  else if (pass && pass.state === "failed") text = `predictions not updated: ${pass.message}`;
  $("pass").textContent = text;
}

function showAhead(ahead) {
  // The next round, computed while the last patch waits for its answer (wsi_il/desk/ahead.py).
  let text = "";
  if (ahead && ahead.preparing) text = "preparing the next round while you look …";
  else if (ahead && ahead.ready) text = "next round ready";
  $("ahead").textContent = text;
}

function showWarmup(warmup) {
  const text = {
    running: "warming up the first round while you label …",
    done: `warmed up for the first round (${warmup.seconds} s, paid while you label)`,
  }[warmup.state] || "";
  $("warmup").textContent = text;
}

async function loadBatch(batchId) {
  if (!batchId) {
    state.batch = null;
    state.order = [];
    renderBatch();
    return;
  }
  const batch = await get(`/api/batches/${enc(batchId)}`);
  state.batch = batch;
  state.order = batch.patches.map((p) => p.patch_id);
  state.labels = {};
  for (const p of batch.patches) if (p.label != null) state.labels[p.patch_id] = p.label;
  state.undo = [];
  const first = state.order.findIndex((id) => state.labels[id] == null);
  state.current = first < 0 ? 0 : first;
  renderBatch();
  if (batch.error) say(batch.error, "error");
  for (const p of batch.patches) new Image().src = contextUrl(p.patch_id, 7); // the zoom-out, ready when asked
}

function patchOf(id) {
  return state.batch.patches.find((p) => p.patch_id === id);
}

function contextUrl(id, tiles) {
  return `/api/patches/${enc(id)}/context.jpeg?tiles=${tiles}`;
}

// ---- rendering --------------------------------------------------------------------------------------------

function renderBatch() {
  const batch = state.batch;
  $("batch-empty").hidden = !!batch;
  $("batch-body").hidden = !batch;
  if (!batch) {
    $("batch-empty").textContent = "No batch waits for labels. Start a session with `wsi-il query`, or look at the "
      + "slide and export the mask.";
    $("progress").textContent = "";
    return;
  }
  const strip = $("strip");
  strip.replaceChildren();
  let group = null;
  batch.patches.forEach((p, i) => {
    const kind = p.confident ? "confident" : "check";
    if (kind !== group) {
      group = kind;
      const title = document.createElement("h3");
      title.className = "group-title";
      title.textContent = kind === "confident"
        ? "The model is confident (a accepts these)"
        : "Uncertain or no suggestion: look closely";
      strip.append(title);
    }
    const item = document.createElement("button");
    item.type = "button";
    item.className = `patch ${kind}`;
    item.dataset.patchId = p.patch_id;
    item.dataset.index = String(i);
    const img = document.createElement("img");
    img.src = contextUrl(p.patch_id, 3);
    img.alt = `patch ${i + 1}`;
    img.loading = "eager";
    const caption = document.createElement("span");
    caption.className = "caption";
    const hint = document.createElement("span");
    hint.className = "hint";
    hint.textContent = p.suggestion == null ? "no suggestion"
      : `${p.confident ? "" : "uncertain: "}${p.suggestion} ${percent(p.probability)}`;
    item.append(img, caption, hint);
    item.addEventListener("click", () => { state.current = i; renderCurrent(); });
    strip.append(item);
  });
  renderCurrent();
}

function renderCurrent() {
  const batch = state.batch;
  if (!batch) return;
  const answered = state.order.filter((id) => state.labels[id] != null).length;
  const total = state.order.length;
  $("progress").textContent = `${state.current + 1} of ${total} · ${answered} answered · batch ${batch.batch} `
    + `(round ${batch.round}/${batch.rounds}, looking for ${batch.query_label})`;
  for (const item of document.querySelectorAll("#strip .patch")) {
    const id = item.dataset.patchId;
    const index = Number(item.dataset.index);
    const p = patchOf(id);
    item.setAttribute("aria-current", index === state.current ? "true" : "false");
    item.classList.toggle("answered", state.labels[id] != null);
    const label = state.labels[id];
    item.querySelector(".caption").textContent = `${index + 1}. ${label != null ? shown(label) : "—"}`;
  }
  const id = state.order[state.current];
  const p = patchOf(id);
  const img = $("current-image");
  img.src = contextUrl(id, state.zoom);
  img.dataset.patchId = id;
  $("current").dataset.patchId = id;
  $("current-caption").textContent = `${id} · ${state.zoom}×${state.zoom} patches around it (z toggles)`;
  renderLocator(p);
  const sugg = $("suggestion");
  sugg.className = p.suggestion == null ? "none" : (p.confident ? "confident" : "uncertain");
  sugg.textContent = p.suggestion == null
    ? "No suggestion yet (no classifier before the first round)"
    : (p.confident
      ? `Model suggests ${p.suggestion} (${percent(p.probability)})`
      : `Uncertain: ${p.suggestion}? only ${percent(p.probability)}, close to a coin toss`);
  const label = state.labels[id];
  $("answer-now").textContent = label != null ? `Your answer: ${shown(label)}` : "Not answered yet";
  $("answer-now").className = label != null ? "given" : "";
  renderKeys($("keys"), batch.classes, batch.query_label, (value) => answer(value));
  $("submit").disabled = answered < total || state.busy;
  const active = document.querySelector('#strip .patch[aria-current="true"]');
  const strip = $("strip");
  if (active && active.offsetLeft < strip.scrollLeft) strip.scrollLeft = active.offsetLeft - 100;
  else if (active && active.offsetLeft + active.offsetWidth > strip.scrollLeft + strip.clientWidth) {
    strip.scrollLeft = active.offsetLeft + active.offsetWidth - strip.clientWidth + 8;
  }
}

function renderLocator(p) {
  const box = $("locator");
  if (!p.has_slide) {
    box.hidden = true;
    return;
  }
  box.hidden = false;
  const img = $("locator-image");
  const url = `/api/slides/${enc(p.slide)}/thumbnail.jpeg`;
  if (img.dataset.src !== url) {
    img.src = url;
    img.dataset.src = url;
  }
  const [x, y, w, h] = p.box;
  const [sw, sh] = p.slide_size;
  const mark = $("locator-mark");
  const place = () => {
    const scale = img.clientWidth / sw;
    mark.style.left = `${x * scale - 4}px`;
    mark.style.top = `${y * scale - 4}px`;
    mark.style.width = `${Math.max(w * scale, 2) + 8}px`;
    mark.style.height = `${Math.max(h * scale, 2) + 8}px`;
    box.style.height = `${sh * scale}px`;
  };
  if (img.complete && img.naturalWidth) place(); else img.onload = place;
}

export function renderKeys(container, classes, queryLabel, act) {
  container.replaceChildren();
  const keys = classes.slice(0, 9).map((c, i) => [String(i + 1), c]);
  keys.push(["y", `yes, ${queryLabel}`], ["n", `no, not ${queryLabel}`], ["s", "skip"]);
  for (const [key, text] of keys) {
    const button = document.createElement("button");
    button.type = "button";
    button.innerHTML = "<kbd></kbd> <span></span>";
    button.querySelector("kbd").textContent = key;
    button.querySelector("span").textContent = text;
    button.addEventListener("click", () => act(key));
    container.append(button);
  }
}

// ---- answering --------------------------------------------------------------------------------------------

export function labelFor(key, classes, queryLabel) {
  if (/^[1-9]$/.test(key)) return classes[Number(key) - 1] ?? null;
  if (key === "y") return queryLabel;
  if (key === "n") {
    const others = classes.filter((c) => c !== queryLabel);
    return classes.length === 2 ? others[0] : `not:${queryLabel}`;
  }
  if (key === "s") return "skip";
  return null;
}

function wire(label) {
  return label == null ? "" : (label.startsWith("not:") ? "no" : label);
}

function send(changes) {
  // One request after the other, in the order given, so that a quick answer-then-clear arrives in that order.
  const batchId = state.batch.batch;
  state.pending += 1;
  state.queue = state.queue.then(async () => {
    try {
      const result = await post(`/api/batches/${enc(batchId)}/answers`, {
        answers: changes.map(([id, label]) => ({ patch_id: id, label: wire(label) })),
      });
      if (state.pending === 1 && state.batch && state.batch.batch === batchId) {
        state.labels = result.labels;  // the file's labels, once no later answer is on its way
        renderCurrent();
      }
      if (result.ahead) {
        showAhead(result.ahead);
        if (result.ahead.preparing) watchServer();
      }
      say("");
    } catch (error) {
      say(error.message, "error");
      if (error instanceof ApiError && error.status === 409) await refresh();
      else await resync(batchId);
    } finally {
      state.pending -= 1;
    }
  });
  return state.queue;
}

async function resync(batchId) {
  // After a refused or lost answer, show the labels as labels.csv holds them.
  try {
    const batch = await get(`/api/batches/${enc(batchId)}`);
    if (state.batch && state.batch.batch === batchId) {
      state.labels = {};
      for (const p of batch.patches) if (p.label != null) state.labels[p.patch_id] = p.label;
      renderCurrent();
    }
  } catch (error) {
    say(error.message, "error");
  }
}

function apply(changes) {
  state.undo.push(changes.map(([id]) => [id, state.labels[id] ?? null]));
  for (const [id, label] of changes) {
    if (label == null) delete state.labels[id]; else state.labels[id] = label;
  }
  send(changes);
}

function answer(key) {
  if (!state.batch || state.busy) return;
  const label = labelFor(key, state.batch.classes, state.batch.query_label);
  if (label == null) return;
  apply([[state.order[state.current], label]]);
  nextUnanswered();
  renderCurrent();
}

function nextUnanswered() {
  const n = state.order.length;
  for (let step = 1; step <= n; step++) {
    const i = (state.current + step) % n;
    if (state.labels[state.order[i]] == null) {
      state.current = i;
      return;
    }
  }
}

function acceptConfident() {
  const changes = state.batch.patches
    .filter((p) => p.confident && state.labels[p.patch_id] == null)
    .map((p) => [p.patch_id, p.suggestion]);
  if (!changes.length) {
    say("no unanswered patch has a confident suggestion");
    return;
  }
  apply(changes);
  say(`accepted the model's suggestion for ${changes.length} confident patches (u undoes)`);
  if (state.labels[state.order[state.current]] != null) nextUnanswered();
  renderCurrent();
}

function clearCurrent() {
  const id = state.order[state.current];
  if (state.labels[id] == null) return;
  apply([[id, null]]);
  renderCurrent();
}

function undo() {
  const last = state.undo.pop();
  if (!last) return;
  for (const [id, label] of last) {
    if (label == null) delete state.labels[id]; else state.labels[id] = label;
  }
  state.current = state.order.indexOf(last[0][0]);
  send(last);
  renderCurrent();
}

function move(step) {
  const n = state.order.length;
  state.current = (state.current + step + n) % n;
  renderCurrent();
}

async function submit() {
  const total = state.order.length;
  if (!state.batch || state.busy || state.order.some((id) => state.labels[id] == null)) return;
  state.busy = true;
  renderCurrent();
  const started = performance.now();
  say(`training on your ${total} answers; the next batch follows …`, "busy");
  try {
    await state.queue;
    const result = await post(`/api/batches/${enc(state.batch.batch)}/submit`);
    await loadBatch(result.next_batch);
    showAhead(null);
    showPass(result.pass);
    if (result.pass && result.pass.state === "running") watchServer();
    state.lastRound = { seconds: (performance.now() - started) / 1000, server: result.seconds,
                        preparedAhead: result.prepared_ahead };
    say(result.next_batch
      ? `${result.message} (${state.lastRound.seconds.toFixed(1)} s)`
      : `${result.message}. Look at the slide (v) or export the mask (t, then e).`);
  } catch (error) {
    say(error.message, "error");
  } finally {
    state.busy = false;
    renderCurrent();
  }
}

async function refresh() {
  await loadProject();
  await loadBatch(state.project.batch);
}

// ---- more like this ------------------------------------------------------------------------------------------

async function openSimilar(fromId) {
  let found;
  try {
    found = (await get(`/api/patches/${enc(fromId)}/similar?n=12`)).patches;
  } catch (error) {
    say(error.message, "error");
    return;
  }
  state.similar = { from: fromId, patches: found, selected: new Set(found.map((p) => p.patch_id)) };
  $("similar-title").textContent = `More like ${fromId}: the ${found.length} nearest unlabelled patches`;
  const classes = state.project.classes;
  $("similar-keys").textContent = classes.slice(0, 9).map((c, i) => `${i + 1} ${c}`).join(", ");
  const grid = $("similar-grid");
  grid.replaceChildren();
  const seed = document.createElement("div");
  seed.className = "patch seed";
  seed.dataset.patchId = fromId;
  seed.innerHTML = "<img alt='the patch these are like'><span class='caption'>like this one</span>";
  seed.querySelector("img").src = contextUrl(fromId, 3);
  grid.append(seed);
  for (const p of found) {
    const item = document.createElement("button");
    item.type = "button";
    item.className = "patch selected";
    item.dataset.patchId = p.patch_id;
    item.innerHTML = "<img alt=''><span class='caption'></span>";
    item.querySelector("img").src = contextUrl(p.patch_id, 3);
    item.querySelector(".caption").textContent = p.suggestion
      ? `${p.confident ? "" : "uncertain: "}${p.suggestion} ${percent(p.probability)}` : "no suggestion";
    item.addEventListener("click", () => {
      if (state.similar.selected.has(p.patch_id)) state.similar.selected.delete(p.patch_id);
      else state.similar.selected.add(p.patch_id);
      item.classList.toggle("selected");
    });
    grid.append(item);
  }
  show("similar");
}

async function labelSimilar(key) {
  const classes = state.project.classes;
  if (!/^[1-9]$/.test(key) || Number(key) > classes.length) return;
  const label = classes[Number(key) - 1];
  const ids = [...state.similar.selected];
  if (!ids.length) return;
  try {
    const result = await post("/api/labels", { answers: ids.map((id) => ({ patch_id: id, label })) });
    say(`${result.written.length} patches labelled ${label} as expert labels outside the batch (one action)`);
    show("batch");
  } catch (error) {
    say(error.message, "error");
  }
}

// ---- status and export ------------------------------------------------------------------------------------

async function loadStatus() {
  const info = await get("/api/status");
  const box = $("status");
  box.replaceChildren();
  const add = (tag, text) => {
    const el = document.createElement(tag);
    el.textContent = text;
    box.append(el);
    return el;
  };
  add("h2", `${info.project}: classes ${info.classes.join(", ")}`);
  add("p", `weights: ${info.weights.description}`);
  add("p", `labels: ${info.n_labels} (${Object.entries(info.labels).map(([k, v]) => `${k}: ${v}`).join(", ")})`
    + `; model: ${info.model || "none yet"}`);
  const table = document.createElement("table");
  table.innerHTML = "<thead><tr><th>session</th><th>label</th><th>strategy</th><th>k</th><th>round</th>"
    + "<th>state</th><th>s/round</th></tr></thead><tbody></tbody>";
  for (const s of info.sessions) {
    const row = table.tBodies[0].insertRow();
    for (const v of [s.id, s.label, s.strategy, s.k, `${s.round}/${s.rounds}`, s.state,
      s.seconds_per_round ? s.seconds_per_round.toFixed(1) : "-"]) row.insertCell().textContent = String(v);
  }
  box.append(table);
  if (info.corrections.length) {
    add("h3", `corrections: ${info.corrections.length} (the ledger keeps every answer; the newest wins)`);
    const list = document.createElement("ul");
    for (const fix of info.corrections.slice(-10)) {
      const li = document.createElement("li");
      li.textContent = `${fix.patch_id}: ${fix.previous || "unlabelled"} → ${fix.label} (${fix.via}, ${fix.time})`;
      list.append(li);
    }
    box.append(list);
  }
  add("p", `next: ${info.next}`).className = "dim";
}

async function exportMask() {
  const button = $("export");
  button.disabled = true;
  say("exporting …", "busy");
  try {
    const result = await post("/api/export");
    const list = $("exports");
    list.replaceChildren();
    for (const name of result.files) {
      const li = document.createElement("li");
      const a = document.createElement("a");
      a.href = `/api/exports/${enc(name)}`;
      a.textContent = name;
      a.download = name;
      li.append(a, document.createTextNode(" (in the project's exports/ folder)"));
      list.append(li);
    }
    say(`exported ${result.files.length} files into the project's exports/ folder`);
  } catch (error) {
    say(error.message, "error");
  } finally {
    button.disabled = false;
  }
}

// ---- views and keys ----------------------------------------------------------------------------------------

function show(view) {
  state.view = view;
  for (const name of ["batch", "similar", "slide", "status"]) $(`${name}-view`).hidden = name !== view;
  for (const tab of document.querySelectorAll("#tabs button")) {
    tab.setAttribute("aria-pressed", tab.dataset.view === view ? "true" : "false");
  }
  if (view === "slide") {
    if (!slideView) slideView = window.deskSlideView = new SlideView(state, { say, refreshBatch: refresh });
    slideView.open();
  }
  if (view === "status") loadStatus().catch((error) => say(error.message, "error"));
  if (view === "batch") renderCurrent();
}

function onKey(event) {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.target instanceof HTMLInputElement || event.target instanceof HTMLSelectElement) return;
  const key = event.key;
  if (key === "b") return show("batch");
  if (key === "v" && !$("slide-tab").hidden) return show("slide");
  if (key === "t") return show("status");
  if (state.view === "slide") {
    if (slideView && slideView.onKey(key)) event.preventDefault();
    return;
  }
  if (state.view === "status") {
    if (key === "e") exportMask();
    return;
  }
  if (state.view === "similar") {
    if (key === "Escape") show("batch"); else labelSimilar(key);
    return;
  }
  if (!state.batch) return;
  const handled = {
    ArrowRight: () => move(1), ArrowDown: () => move(1), j: () => move(1),
    ArrowLeft: () => move(-1), ArrowUp: () => move(-1), k: () => move(-1),
    Backspace: clearCurrent, u: undo, a: acceptConfident, Enter: submit,
    z: () => { state.zoom = state.zoom === 3 ? 7 : 3; renderCurrent(); },
    m: () => openSimilar(state.order[state.current]),
  }[key];
  if (handled) {
    event.preventDefault();
    handled();
  } else if (/^[1-9yns]$/.test(key)) {
    event.preventDefault();
    answer(key);
  }
}

async function main() {
  document.addEventListener("keydown", onKey);
  for (const tab of document.querySelectorAll("#tabs button")) tab.addEventListener("click", () => show(tab.dataset.view));
  $("submit").addEventListener("click", submit);
  $("export").addEventListener("click", exportMask);
  try {
    await refresh();
  } catch (error) {
    say(error.message, "error");
  }
  show("batch");
  document.body.dataset.ready = "true";
  watchServer();
}

let poll = null;

function watchServer() {
  // The warm-up's, the round prepared ahead's and the full pass's progress, every 2 s while one is under way.
  if (poll) return;
  poll = setInterval(async () => {
    try {
      const project = await get("/api/project");
      showWarmup(project.warmup);
      showAhead(project.ahead);
      showPass(project.pass);
      const warming = project.warmup.state === "running" || project.warmup.state === "not started";
      const passing = project.pass && project.pass.state === "running";
      if (!warming && !passing && !(project.ahead && project.ahead.preparing)) stopWatching();
    } catch (error) {
      stopWatching();
    }
  }, 2000);
}

function stopWatching() {
  clearInterval(poll);
  poll = null;
}

main();
