// NextStep Model Loader in the graph editor: the memory plan of the chosen model in the weight mode the
// loader will use (its `memory` choice resolved as loading resolves it) on this server's run device
// (GET /nextstep/plan), for the job of the sampler it feeds; asked again whenever a widget it depends on
// changes.

import { formatBytes } from "./format.js";
import { addTextPanel } from "./text_widget.js";
import { onWidgetChange, widgetValue } from "./widgets.js";

const MODE_WIDGETS = ["model_name", "dtype", "memory", "fp8", "gpu_layers", "device"];
const JOB_WIDGETS = { width: "width", height: "height", batch: "batch_size", cfg: "cfg", cfg_img: "cfg_img", steps: "steps" };
const DEBOUNCE_MS = 250;

/** The first NextStep Sampler fed by the loader's model output, if any. */
function fedSampler(node) {
  for (const linkId of node.outputs?.[0]?.links ?? []) {
    const link = node.graph?.links?.get?.(linkId) ?? node.graph?.links?.[linkId];
    const target = link && node.graph.getNodeById(link.target_id);
    if (target?.comfyClass === "NextStepSampler") return target;
  }
  return null;
}

function planQuery(node) {
  const query = new URLSearchParams();
  for (const name of MODE_WIDGETS) {
    const value = widgetValue(node, name);
    if (value !== undefined) query.set(name === "model_name" ? "model" : name, String(value));
  }
  const sampler = fedSampler(node);
  for (const [parameter, widget] of Object.entries(JOB_WIDGETS)) {
    const value = sampler && widgetValue(sampler, widget);
    if (value !== undefined && value !== null) query.set(parameter, String(value));
  }
  return query.toString();
}

function planLines(plan) {
  const tone = plan.fits === null ? "muted" : plan.fits ? "ok" : "warn";
  const streamed = plan.weights_host_bytes ? ` (+${formatBytes(plan.weights_host_bytes)} in RAM)` : "";
  if (plan.devices) {  // split over several devices (docs/multi-gpu.md): the peak on each
    return [[plan.advice, tone], [`loads as ${plan.loads_as}, layers ${plan.placement}`, ""],
      [plan.devices.map((d) => `${d.device} peak ${formatBytes(d.peak_bytes)}`).join(" · ") + streamed, "muted"]];
  }
  return [[plan.advice, tone], [`loads as ${plan.loads_as}`, ""],
    [`weights ${formatBytes(plan.weights_gpu_bytes)}${streamed} · KV cache ` +
    `${formatBytes(plan.kv_cache_bytes)} · peak ${formatBytes(plan.peak_gpu_bytes)}`, "muted"]];
}

export function setupLoader(node, api) {
  const show = addTextPanel(node, "nextstep_plan", 3);
  let asked = null;
  let timer = null;

  async function ask(query) {
    try {
      const response = await api.fetchApi(`/nextstep/plan?${query}`);
      const answer = await response.json();
      if (query !== asked) return;  // a newer question is on its way
      show(response.ok ? planLines(answer) : [[answer.error, "warn"]]);
    } catch (error) {
      if (query === asked) show([[`memory plan unavailable: ${error.message}`, "warn"]]);
    }
  }

  node.nextstepRefresh = () => {
    const query = planQuery(node);
    if (query === asked || !widgetValue(node, "model_name")) return;
    asked = query;
    clearTimeout(timer);
    timer = setTimeout(() => ask(query), DEBOUNCE_MS);
  };
  onWidgetChange(node, MODE_WIDGETS, node.nextstepRefresh);
  show([["memory plan: …", "muted"]]);
  node.nextstepRefresh();
}
