// NextStep Model Loader in the graph editor: the memory plan of the chosen model in the weight mode and on the
// devices the loader will use (its `memory` choice resolved as loading resolves it, GET /nextstep/plan), for the
// job of the sampler it feeds; asked again whenever a widget it depends on
// changes. The install's warnings for the loader's chosen settings (doctor.js), e.g. "compile unavailable: no C++
// compiler ...; running uncompiled", take the place of its last line. A released model not on disk yet shows what
// Run will fetch instead: the repo, the GB still to come, the folder and the disk's free space.

import { installWarnings, SETTING_WIDGETS, warningsFor } from "./doctor.js";
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

/** The bytes of the plan's devices in one line: the parts of one device's peak, or each device's peak. */
function deviceLine(plan) {
  const streamed = plan.weights_host_bytes ? ` (+${formatBytes(plan.weights_host_bytes)} in RAM)` : "";
  if (plan.devices.length === 1) {
    const [device] = plan.devices;
    return `weights ${formatBytes(device.weights_bytes)}${streamed} · KV cache ` +
      `${formatBytes(device.kv_cache_bytes)} · peak ${formatBytes(device.peak_bytes)}`;
  }
  return plan.devices.map((d) => `${d.device} peak ${formatBytes(d.peak_bytes)}`).join(" · ") + streamed;
}

function planLines(plan) {
  const tone = plan.fits === null ? "muted" : plan.fits ? "ok" : "warn";
  const layers = plan.placement.includes(",") ? `, layers ${plan.placement}` : "";
  return [[plan.advice, tone], [`loads as ${plan.loads_as}${layers}`, ""], [deviceLine(plan), "muted"]];
}

/** A released model not on disk yet: what Run will fetch, how much, and where (GET /nextstep/plan's `fetch`), the
 * short facts first so that a narrow node still shows them (each line's whole text is its tooltip). */
export function fetchLines(fetch) {
  const sizes = fetch.to_fetch_bytes === null ? "it" :
    fetch.to_fetch_bytes === fetch.total_bytes ? formatBytes(fetch.total_bytes) :
    `${formatBytes(fetch.to_fetch_bytes)} left of ${formatBytes(fetch.total_bytes)}`;
  return [[`not on disk: Run fetches ${sizes}`, fetch.problem ? "warn" : "ok"],
    [fetch.problem ?? `${fetch.repo} · ${formatBytes(fetch.free_bytes)} free`, fetch.problem ? "warn" : ""],
    [`into ${fetch.folder}`, "muted"]];
}

/** The plan's lines with the install's warning, if any, in place of the last (muted) detail line: the panel
 * keeps its three lines, so saved workflows keep their layout. */
function withWarning(lines, warning) {
  return warning ? [...lines.slice(0, 2), [warning, "warn"]] : lines;
}

export function setupLoader(node, api) {
  const showLines = addTextPanel(node, "nextstep_plan", 3);
  let planShown = [["memory plan: …", "muted"]];
  let warning = null;  // the install's warnings for the chosen settings, as one line
  let asked = null;
  let timer = null;

  const render = () => showLines(withWarning(planShown, warning));
  const show = (lines) => {
    planShown = lines;
    render();
  };

  async function ask(query) {
    try {
      const response = await api.fetchApi(`/nextstep/plan?${query}`);
      const answer = await response.json();
      if (query !== asked) return;  // a newer question is on its way
      show(!response.ok ? [[answer.error, "warn"]] : answer.fetch ? fetchLines(answer.fetch) : planLines(answer));
    } catch (error) {
      if (query === asked) show([[`memory plan unavailable: ${error.message}`, "warn"]]);
    }
  }

  const refreshPlan = () => {
    const query = planQuery(node);
    if (query === asked || !widgetValue(node, "model_name")) return;
    asked = query;
    clearTimeout(timer);
    timer = setTimeout(() => ask(query), DEBOUNCE_MS);
  };
  onWidgetChange(node, MODE_WIDGETS, refreshPlan);
  const deviceText = () => String(widgetValue(node, "device") ?? "default");
  const checkInstall = () => {
    const device = deviceText();
    installWarnings(api, device).then((warnings) => {
      if (device !== deviceText()) return;  // a newer device's answer is on its way
      warning = warningsFor(node, warnings).join(" · ") || null;
      render();
    }, (error) => {
      if (device !== deviceText()) return;
      warning = `install check unavailable: ${error.message}`;
      render();
    });
  };
  onWidgetChange(node, SETTING_WIDGETS, checkInstall);
  node.nextstepRefresh = () => {  // also once a saved workflow's widget values have arrived
    refreshPlan();
    checkInstall();
  };
  render();
  node.nextstepRefresh();
}
