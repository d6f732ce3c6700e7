// Concept Ablation front-end: a live loss curve with ETA on Ablate Concept (and, after the run, the held-out check's
// summary, or "cancelled" / "failed"), a live status line and then the solve's summary on Erase Concepts (Closed
// Form) and a fusing Merge Ablation Patches, patch metadata on Load Ablation Patch, and status text (fingerprint
// check, saved file, what was merged) on the other nodes.
//
// Both are canvas widgets added after the node's own widgets: they take part in the node's layout (so the chart never
// hides behind the anchor_prompts text box) and are not serialized (so workflow files keep their widgets_values).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const PROGRESS_EVENT = "concept_ablation.progress";
const CATEGORY = "conditioning/ablation";
const CHART_HEIGHT = 110;
const TEXT_LINE = 14;
const MAX_TEXT_LINES = 24;
// Nodes of ours that may run for a while without the chart: they say "starting..." until their first progress event.
const LONG_RUNNING = new Set(["EraseConceptsClosedForm", "MergeAblationPatches", "SaveAblationPatch",
  "AblationReport"]);

function nodeById(id) {
  return id == null ? null : app.graph.getNodeById(Number(id));
}

function formatEta(seconds) {
  if (seconds == null) return "";
  const s = Math.max(0, Math.round(seconds));
  return s >= 60 ? `${Math.floor(s / 60)}m ${s % 60}s left` : `${s}s left`;
}

function fitToWidgets(node) {
  const wanted = node.computeSize();
  if (node.size[1] < wanted[1] || node.size[0] < wanted[0]) {
    node.setSize([Math.max(node.size[0], wanted[0]), Math.max(node.size[1], wanted[1])]);
  }
  node.setDirtyCanvas(true, true);
}

function drawChart(ctx, state, x, y, width) {
  ctx.save();
  ctx.fillStyle = "rgba(0,0,0,0.35)";
  ctx.fillRect(x, y, width, CHART_HEIGHT);
  ctx.fillStyle = state.stopped ? "#f96" : "#ddd";
  ctx.font = "11px sans-serif";
  ctx.fillText(state.status || "loss curve: appears when the node runs", x + 6, y + 14);
  const losses = state.losses;
  if (losses.length > 1) {
    const top = y + 22;
    const height = CHART_HEIGHT - 30;
    const lo = Math.min(...losses);
    const hi = Math.max(...losses);
    const span = hi - lo || 1;
    const total = Math.max(state.total, losses.length);
    ctx.strokeStyle = "#6cf";
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    losses.forEach((loss, i) => {
      const px = x + 6 + (i / Math.max(total - 1, 1)) * (width - 60);
      const py = top + height - ((loss - lo) / span) * height;
      if (i === 0) ctx.moveTo(px, py);
      else ctx.lineTo(px, py);
    });
    ctx.stroke();
    ctx.fillStyle = "#aaa";
    ctx.fillText(hi.toPrecision(3), x + width - 48, top + 8);
    ctx.fillText(lo.toPrecision(3), x + width - 48, top + height);
  }
  ctx.restore();
}

function addChartWidget(node) {
  node.ablation = { losses: [], total: 0, status: "", activity: "", running: false, stopped: false };
  node.addCustomWidget({
    name: "loss_chart",
    type: "concept_ablation_chart",
    value: null,
    serialize: false,
    options: { serialize: false },
    computeSize: (width) => [width ?? node.size[0], CHART_HEIGHT],
    draw(ctx, owner, width, y) {
      drawChart(ctx, owner.ablation, 10, y, width - 20);
    },
  });
}

// Lines broken at spaces to fit the node's width (monospace, so characters per line are known).
function wrapLines(lines, width) {
  const chars = Math.max(10, Math.floor((width - 20) / 6.6));
  const wrapped = [];
  for (const line of lines) {
    let rest = line;
    while (rest.length > chars) {
      const cut = rest.lastIndexOf(" ", chars) > chars / 2 ? rest.lastIndexOf(" ", chars) : chars;
      wrapped.push(rest.slice(0, cut));
      rest = rest.slice(cut).trimStart();
    }
    wrapped.push(rest);
  }
  return wrapped.slice(0, MAX_TEXT_LINES);
}

function addTextWidget(node) {
  node.ablationText = [];
  const lines = (width) => (node.ablationText.length ? wrapLines(node.ablationText, width ?? node.size[0]) : []);
  node.addCustomWidget({
    name: "ablation_info",
    type: "concept_ablation_text",
    value: null,
    serialize: false,
    options: { serialize: false },
    computeSize: (width) => [width ?? node.size[0], lines(width).length ? lines(width).length * TEXT_LINE + 6 : 0],
    draw(ctx, owner, width, y) {
      const shown = lines(width);
      if (!shown.length) return;
      ctx.save();
      ctx.fillStyle = owner.ablation?.stopped || owner.ablationRun?.stopped ? "#f96" : "#ccc";
      ctx.font = "11px monospace";
      shown.forEach((line, i) => ctx.fillText(line, 10, y + (i + 1) * TEXT_LINE - 2));
      ctx.restore();
    },
  });
}

function setText(node, text) {
  node.ablationText = text ? String(text).split("\n") : [];
  fitToWidgets(node);
}

function ablateNodes() {
  return (app.graph?._nodes ?? []).filter((node) => node.ablation);
}

// The whole node's share done and time left, from its one progress plan (every event carries both).
function runShare(detail) {
  const share = detail.fraction == null ? "" : `${Math.floor(detail.fraction * 100)}%`;
  return [share, formatEta(detail.eta)].filter(Boolean).join(", ");
}

// "Encoding prompts 24/400 (6%, 1m 12s left)": a phase's own count, then the node's.
function phaseLine(detail) {
  const run = runShare(detail);
  return `${detail.title ?? detail.phase} ${detail.step}/${detail.total}${run ? ` (${run})` : ""}`;
}

// Nodes without the chart (Erase Concepts, fusion, Save, Report): one status line while they run, then the summary.
function showStatus(node, detail) {
  if (detail.phase === "done") {
    node.ablationRun = { running: false, stopped: false };
    setText(node, detail.summary || "");
  } else {
    setText(node, phaseLine(detail));
  }
}

api.addEventListener(PROGRESS_EVENT, ({ detail }) => {
  const node = nodeById(detail.node);
  if (node?.ablationText && !node.ablation) return showStatus(node, detail);
  if (!node?.ablation) return;
  const state = node.ablation;
  Object.assign(state, { running: detail.phase !== "done", stopped: false });
  if (detail.phase === "train") {
    // a report while a step runs ("within" > 0) repeats the last step's loss: the bar moves, the curve does not
    if (!(detail.within > 0)) {
      if (detail.step <= 1) state.losses = [];
      if (detail.loss != null) state.losses.push(detail.loss);
    }
    state.total = detail.total;
    state.activity = `step ${detail.step}/${detail.total}`;
    const loss = detail.loss != null ? `  loss ${detail.loss.toPrecision(4)}` : "";
    const run = runShare(detail);
    state.status = `${state.activity}${loss}${run ? `  (${run})` : ""}`;
  } else if (detail.phase === "done") {
    // The full curve: a live run's own losses, or the one stored in a cached patch (not only first and last).
    if (detail.losses?.length) state.losses = detail.losses;
    if (detail.cached) state.total = state.losses.length;
    const last = state.losses.length ? state.losses[state.losses.length - 1].toPrecision(4) : "?";
    state.status = detail.cached ? `reused cached result (final loss ${last})` : `done, final loss ${last}`;
    if (detail.summary) setText(node, detail.summary);
  } else {
    // prompts, anchor images, the held-out check, a robust round's adversary, writing the cache: the curve stays
    if (detail.phase === "prompts" && detail.step === 0 && !(detail.within > 0)) state.losses = [];
    state.activity = phaseLine(detail);
    state.status = state.activity;
  }
  node.setDirtyCanvas(true, true);
});

// A new run of the node: forget the last one's summary and status (a long one says it is running meanwhile).
api.addEventListener("executing", ({ detail }) => {
  const node = detail == null ? null : nodeById(detail);
  // Another node (or none: the end) is running now, so ours that ran before have finished, "executed" message or not.
  for (const other of app.graph?._nodes ?? []) {
    if (other !== node && other.ablationRun?.running) other.ablationRun.running = false;
  }
  if (node?.ablationText && !node.ablation) {
    node.ablationRun = { running: true, stopped: false };
    setText(node, LONG_RUNNING.has(node.type) ? "starting..." : "");
    return;
  }
  if (!node?.ablation) return;
  Object.assign(node.ablation, { losses: [], total: 0, activity: "", status: "starting..." });
  Object.assign(node.ablation, { running: true, stopped: false });
  setText(node, "");
});

// Cancel or an error ends the run without a "done" event: say so instead of leaving the last step and its ETA.
function markStopped(how, message) {
  for (const node of app.graph?._nodes ?? []) {
    if (!node.ablationRun?.running) continue;
    node.ablationRun = { running: false, stopped: true };
    setText(node, message);
  }
  for (const node of ablateNodes()) {
    const state = node.ablation;
    if (!state.running) continue;
    const where = state.activity ? ` during ${state.activity}` : "";
    Object.assign(state, { running: false, stopped: true, status: `${how}${where}` });
    setText(node, message);
  }
}

api.addEventListener("execution_interrupted", () => {
  markStopped("cancelled", "cancelled: nothing was saved and the model is unchanged");
});

api.addEventListener("execution_error", ({ detail }) => {
  const message = String(detail?.exception_message ?? "").trim().split("\n").slice(0, 4).join("\n");
  markStopped("failed", message ? `failed: ${message}` : "failed: see the ComfyUI console");
});

async function showPatchInfo(node, name) {
  if (!name) return;
  try {
    const response = await api.fetchApi(`/concept_ablation/patch_info?name=${encodeURIComponent(name)}`);
    const info = await response.json();
    if (info.error) return setText(node, info.error);
    const meta = info.metadata || {};
    const pick = (key) => meta[`ablation.${key}`];
    const lines = [
      `${info.layers} layers, ${info.storage}${info.max_rank ? ` rank ${info.max_rank}` : ""}`,
      `targets: ${pick("targets") ?? "?"}  anchors: ${pick("anchors") ?? "?"}`,
      `method: ${pick("method") ?? meta.ss_network_module ?? "?"}  group: ${pick("group") ?? "?"}`,
      `base: ${pick("base_family") ?? meta.ss_base_model_version ?? "?"}  fingerprint: ${pick("base_fingerprint") ?? "-"}`,
    ];
    setText(node, lines.join("\n"));
  } catch (err) {
    setText(node, `no metadata: ${err}`);
  }
}

function watchPatchName(node) {
  const widget = node.widgets?.find((w) => w.name === "patch_name");
  if (!widget) return;
  const callback = widget.callback;
  widget.callback = (value, ...rest) => {
    callback?.call(widget, value, ...rest);
    showPatchInfo(node, value);
  };
  // After a workflow is loaded, widget values are restored without the callback.
  setTimeout(() => showPatchInfo(node, widget.value), 0);
}

app.registerExtension({
  name: "concept_ablation.ui",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    // By category, not python_module: the folder name differs between git clone, the Manager and a symlink.
    if (nodeData.category !== CATEGORY) return;
    const isAblate = nodeData.name === "AblateConcept";
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      if (isAblate) addChartWidget(this);
      addTextWidget(this);
      if (nodeData.name === "LoadAblationPatch") watchPatchName(this);
      fitToWidgets(this);
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      // Saved workflows carry their own node size; make room for the chart / text.
      fitToWidgets(this);
      if (nodeData.name === "LoadAblationPatch") {
        const widget = this.widgets?.find((w) => w.name === "patch_name");
        if (widget) setTimeout(() => showPatchInfo(this, widget.value), 0);
      }
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (this.ablationRun) this.ablationRun.running = false;
      if (message?.text) setText(this, message.text.join("\n"));
    };
  },
});
