// Concept Ablation front-end: a live loss curve with ETA on Ablate Concept, patch metadata on Load Ablation Patch,
// and status text (fingerprint check, saved file) on the other nodes.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const PROGRESS_EVENT = "concept_ablation.progress";
const CHART_HEIGHT = 110;
const TEXT_LINE = 14;

function nodeById(id) {
  return id == null ? null : app.graph.getNodeById(Number(id));
}

function formatEta(seconds) {
  if (seconds == null) return "";
  const s = Math.max(0, Math.round(seconds));
  return s >= 60 ? `${Math.floor(s / 60)}m ${s % 60}s left` : `${s}s left`;
}

function growToFit(node, extra) {
  const wanted = node.computeSize()[1] + extra;
  if (node.size[1] < wanted) node.setSize([node.size[0], wanted]);
}

function drawChart(node, ctx) {
  const state = node.ablation;
  if (!state) return;
  const x = 10;
  const width = node.size[0] - 20;
  const y = node.size[1] - CHART_HEIGHT - 6;
  ctx.save();
  ctx.fillStyle = "rgba(0,0,0,0.35)";
  ctx.fillRect(x, y, width, CHART_HEIGHT);
  ctx.fillStyle = "#ddd";
  ctx.font = "11px sans-serif";
  ctx.fillText(state.status, x + 6, y + 14);
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
      const px = x + 6 + (i / Math.max(total - 1, 1)) * (width - 12);
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

function drawText(node, ctx) {
  const lines = node.ablationText;
  if (!lines || !lines.length) return;
  ctx.save();
  ctx.fillStyle = "#ccc";
  ctx.font = "11px monospace";
  const top = node.size[1] - lines.length * TEXT_LINE - 4;
  lines.forEach((line, i) => ctx.fillText(line.slice(0, 90), 10, top + (i + 1) * TEXT_LINE - 3));
  ctx.restore();
}

function setText(node, text) {
  node.ablationText = String(text || "").split("\n").slice(0, 24);
  growToFit(node, node.ablationText.length * TEXT_LINE + 8);
  node.setDirtyCanvas(true, true);
}

api.addEventListener(PROGRESS_EVENT, ({ detail }) => {
  const node = nodeById(detail.node);
  if (!node) return;
  const state = (node.ablation ||= { losses: [], total: 0, status: "" });
  if (detail.phase === "anchors") {
    if (detail.step <= 1 || state.done) Object.assign(state, { losses: [], done: false });
    state.status = `sampling anchor images ${detail.step}/${detail.total}`;
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
  growToFit(node, CHART_HEIGHT + 10);
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

app.registerExtension({
  name: "concept_ablation.ui",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    // By category, not python_module: the folder name differs between git clone, the Manager and a symlink.
    const ours = nodeData.category === "conditioning/ablation";
    if (!ours) return;
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      if (nodeData.name === "AblateConcept") drawChart(this, ctx);
      else drawText(this, ctx);
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text && nodeData.name !== "AblateConcept") setText(this, message.text.join("\n"));
    };
    if (nodeData.name === "LoadAblationPatch") {
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        onNodeCreated?.apply(this, arguments);
        const widget = this.widgets?.find((w) => w.name === "patch_name");
        if (!widget) return;
        const callback = widget.callback;
        widget.callback = (value, ...rest) => {
          callback?.call(widget, value, ...rest);
          showPatchInfo(this, value);
        };
        setTimeout(() => showPatchInfo(this, widget.value), 0);
      };
    }
  },
});
