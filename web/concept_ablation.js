// Concept Ablation front-end: a live loss curve with ETA on Ablate Concept, patch metadata on Load Ablation Patch,
// and status text (fingerprint check, saved file) on the other nodes.
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
  ctx.fillStyle = "#ddd";
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
  node.ablation = { losses: [], total: 0, status: "" };
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

function addTextWidget(node) {
  node.ablationText = [];
  node.addCustomWidget({
    name: "ablation_info",
    type: "concept_ablation_text",
    value: null,
    serialize: false,
    options: { serialize: false },
    computeSize: (width) => [width ?? node.size[0], node.ablationText.length ? node.ablationText.length * TEXT_LINE + 6 : 0],
    draw(ctx, owner, width, y) {
      const lines = owner.ablationText;
      if (!lines.length) return;
      ctx.save();
      ctx.fillStyle = "#ccc";
      ctx.font = "11px monospace";
      const chars = Math.max(10, Math.floor((width - 20) / 6.6));
      lines.forEach((line, i) => ctx.fillText(line.slice(0, chars), 10, y + (i + 1) * TEXT_LINE - 2));
      ctx.restore();
    },
  });
}

function setText(node, text) {
  node.ablationText = String(text || "").split("\n").slice(0, MAX_TEXT_LINES);
  fitToWidgets(node);
}

api.addEventListener(PROGRESS_EVENT, ({ detail }) => {
  const node = nodeById(detail.node);
  if (!node?.ablation) return;
  const state = node.ablation;
  if (detail.phase === "prompts") {
    Object.assign(state, { losses: [], done: false, status: `encoding prompts ${detail.step}/${detail.total}` });
  } else if (detail.phase === "anchors") {
    if (detail.step <= 1 || state.done) Object.assign(state, { losses: [], done: false });
    state.status = `sampling anchor images ${detail.step}/${detail.total}  ${formatEta(detail.eta)}`.trim();
  } else if (detail.phase === "train") {
    if (detail.step === 1) state.losses = [];
    state.losses.push(detail.loss);
    state.total = detail.total;
    state.status = `step ${detail.step}/${detail.total}  loss ${detail.loss.toPrecision(4)}  ${formatEta(detail.eta)}`;
  } else if (detail.phase === "done") {
    state.done = true;
    if (detail.cached) state.losses = detail.losses || [];
    const last = state.losses.length ? state.losses[state.losses.length - 1].toPrecision(4) : "?";
    state.status = detail.cached ? `reused cached result (final loss ${last})` : `done, final loss ${last}`;
  }
  node.setDirtyCanvas(true, true);
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
      else addTextWidget(this);
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
      if (message?.text && !isAblate) setText(this, message.text.join("\n"));
    };
  },
});
