// The slide view: the slide zoomable (OpenSeadragon over the server's Deep Zoom tiles), overlays to toggle, and a
// click on a patch to label it: an expert correction outside the sampler (or its answer, when the patch is in the
// batch that waits).

import { enc, get, post } from "./api.js";

const $ = (id) => document.getElementById(id);
const OVERLAY_KEYS = { p: "probability", l: "labelled", q: "query", c: "batch" };
const OPACITY = { probability: 0.6, labelled: 1, query: 1, batch: 1 };

export class SlideView {
  constructor(state, { say, refreshBatch }) {
    this.state = state;
    this.say = say;
    this.refreshBatch = refreshBatch;
    this.viewer = null;
    this.slideId = null;
    this.overlays = {};
    this.picked = null;
    const choice = $("slide-choice");
    for (const slide of state.project.slides.filter((s) => s.kind === "slide")) {
      const option = document.createElement("option");
      option.value = slide.id;
      option.textContent = `${slide.id} (${slide.patches} patches)`;
      choice.append(option);
    }
    choice.addEventListener("change", () => this.openSlide(choice.value));
    for (const box of document.querySelectorAll("#slide-bar input[data-overlay]")) {
      box.addEventListener("change", () => this.applyOverlay(box.dataset.overlay));
    }
  }

  async open() {
    const choice = $("slide-choice");
    if (this.slideId !== choice.value) await this.openSlide(choice.value);
    else this.reloadOverlays();
  }

  async openSlide(slideId) {
    this.slideId = slideId;
    const dzi = await get(`/api/slides/${enc(slideId)}/dzi.json`);
    dzi.Image.Url = `/api/slides/${enc(slideId)}/tiles/`;
    if (this.viewer) this.viewer.destroy();
    this.viewer = window.OpenSeadragon({
      element: $("viewer"),
      prefixUrl: "/static/vendor/openseadragon/images/",
      tileSources: dzi,
      showNavigator: true,
      drawer: "canvas",
      imageSmoothingEnabled: false,
      gestureSettingsMouse: { clickToZoom: false },
      maxZoomPixelRatio: 4,
      crossOriginPolicy: false,
    });
    this.size = { width: Number(dzi.Image.Size.Width), height: Number(dzi.Image.Size.Height) };
    this.overlays = {};
    this.viewer.addHandler("open", () => {
      this.ready = true;
      this.reloadOverlays();
    });
    this.viewer.addHandler("canvas-click", (event) => {
      if (!event.quick) return;
      const point = this.viewer.viewport.viewerElementToImageCoordinates(event.position);
      this.pickAt(point.x, point.y);
    });
    this.showLegend();
  }

  reloadOverlays() {
    if (!this.viewer || !this.ready) return;
    for (const kind of Object.keys(OPACITY)) {
      const old = this.overlays[kind];
      this.overlays[kind] = null;
      const url = `/api/slides/${enc(this.slideId)}/overlays/${kind}.png?t=${Date.now()}`;
      this.viewer.addSimpleImage({
        url,
        x: 0,
        y: 0,
        width: 1,
        opacity: this.enabled(kind) ? OPACITY[kind] : 0,
        success: (event) => {
          this.overlays[kind] = event.item;
          if (old) this.viewer.world.removeItem(old);
          this.applyOverlay(kind);
        },
      });
    }
  }

  enabled(kind) {
    return document.querySelector(`#slide-bar input[data-overlay="${kind}"]`).checked;
  }

  applyOverlay(kind) {
    const item = this.overlays[kind];
    if (item) item.setOpacity(this.enabled(kind) ? OPACITY[kind] : 0);
    $("viewer").dataset[`overlay${kind[0].toUpperCase()}${kind.slice(1)}`] = this.enabled(kind) ? "on" : "off";
  }

  showLegend() {
    const classes = this.state.project.classes;
    $("legend").textContent = `probability of the query's class: blue 0 · yellow 0.5 · red 1; `
      + `labelled: class colours (${classes.join(", ")}), grey = skip or "not"; query: gold; batch: cyan. `
      + "Click a patch to label it.";
  }

  async pickAt(x, y) {
    const found = await get(`/api/slides/${enc(this.slideId)}/patch_at?x=${x}&y=${y}`);
    if (!found.patch_id) {
      this.say("no tissue patch there");
      return;
    }
    await this.pick(found.patch_id);
  }

  async pick(patchId) {
    const info = await get(`/api/patches/${enc(patchId)}`);
    this.picked = info;
    const panel = $("picked");
    panel.hidden = false;
    panel.dataset.patchId = patchId;
    $("picked-image").src = `/api/patches/${enc(patchId)}/context.jpeg?tiles=3`;
    const lines = [
      patchId,
      info.label ? `label now: ${info.label.replace(/^not:/, "not ")}` : "not labelled",
      info.suggestion ? `${info.confident ? "model suggests" : "uncertain:"} ${info.suggestion} `
        + `(${Math.round(info.probability * 100)}%)` : "no suggestion yet",
    ];
    if (info.history.length > 1) {
      lines.push(`history: ${info.history.map((h) => h.label).join(" → ")}`);
    }
    if (info.waiting_batch) lines.push(`in the batch that waits (${info.waiting_batch}): your key answers it there`);
    else lines.push("a key records an expert correction (the ledger keeps the old answer)");
    $("picked-text").replaceChildren(...lines.map((text) => {
      const p = document.createElement("p");
      p.textContent = text;
      return p;
    }));
    const keys = $("picked-keys");
    keys.replaceChildren();
    const { renderKeys } = await import("./desk.js");
    const query = this.state.batch ? this.state.batch.query_label : info.classes[0];
    renderKeys(keys, info.classes, query, (key) => this.label(key));
  }

  async label(key) {
    const info = this.picked;
    if (!info) return;
    const { labelFor } = await import("./desk.js");
    const query = this.state.batch ? this.state.batch.query_label : info.classes[0];
    let label = labelFor(key, info.classes, query);
    if (label == null) return;
    if (label.startsWith("not:")) label = "no";
    try {
      if (info.waiting_batch) {
        await post(`/api/batches/${enc(info.waiting_batch)}/answers`, {
          answers: [{ patch_id: info.patch_id, label }],
        });
        await this.refreshBatch();
        this.say(`${info.patch_id}: answered ${label} in batch ${info.waiting_batch}`);
      } else {
        const result = await post("/api/labels", { answers: [{ patch_id: info.patch_id, label }] });
        this.say(result.written.length
          ? `${info.patch_id}: corrected to ${result.written[0].label} (recorded as an expert correction)`
          : `${info.patch_id} already has that label`);
      }
      await this.pick(info.patch_id);
      this.reloadOverlays();
    } catch (error) {
      this.say(error.message, "error");
    }
  }

  onKey(key) {
    if (OVERLAY_KEYS[key]) {
      const box = document.querySelector(`#slide-bar input[data-overlay="${OVERLAY_KEYS[key]}"]`);
      box.checked = !box.checked;
      this.applyOverlay(OVERLAY_KEYS[key]);
      return true;
    }
    if (this.picked && /^[1-9yns]$/.test(key)) {
      this.label(key);
      return true;
    }
    if (key === "Escape" && this.picked) {
      $("picked").hidden = true;
      this.picked = null;
      return true;
    }
    return false;
  }
}
