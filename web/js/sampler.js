// NextStep Sampler in the graph editor: a preset picker (the served table of recommended settings), a
// picker of trained sizes, and a status panel: the token count and guidance rows before a run, live
// progress while it runs (from this node's `progress` events), the total time or where it stopped.

import { formatDuration, formatRunning } from "./format.js";
import { CUSTOM_SIZE, TRAINED_SIZES, sizeEntry, sizeLabel, sizeOf } from "./sizes.js";
import { addTextPanel } from "./text_widget.js";
import { addPickerWidget, onWidgetChange, setWidgetValue, showPicked, widgetValue } from "./widgets.js";

/** The Sampler widgets a preset sets (its negative prompt lives in a Text Encode node: shown, not set). */
export const PRESET_WIDGETS = ["steps", "cfg", "cfg_img", "timesteps_shift", "sampler", "profile", "use_norm",
  "width", "height"];
const CUSTOM_PRESET = "custom";
const TOKEN_PIXELS = 16;  // one token is a 2x2 patch of 8x-downsampled latents
const SETTINGS = ["width", "height", "batch_size", "cfg", "cfg_img", ...PRESET_WIDGETS];

/** Rows per image, as nextstep_runtime.prompt.guidance_groups counts them: 1 without guidance, 2 with
 * text guidance, 3 with text and image guidance (editing). */
function guidanceGroups(cfg, cfgImg, editing) {
  if (cfg <= 1) return 1;
  return editing && cfgImg > 1 ? 3 : 2;
}

/** Whether the positive prompt carries an input image (a NextStep Text Encode with `image` connected). */
function isEditing(node) {
  const slot = node.inputs?.findIndex((input) => input.name === "positive");
  const encoder = slot >= 0 ? node.getInputNode(slot) : null;
  return Boolean(encoder?.inputs?.find((input) => input.name === "image")?.link != null);
}

function tokenCount(node) {
  return Math.floor(widgetValue(node, "width") / TOKEN_PIXELS) * Math.floor(widgetValue(node, "height") / TOKEN_PIXELS);
}

function sameValue(a, b) {
  return typeof a === "number" && typeof b === "number" ? Math.abs(a - b) < 1e-9 : a === b;
}

/** The preset whose values the widgets hold now, or CUSTOM_PRESET. */
function matchingPreset(node, presets) {
  const name = Object.keys(presets).find((candidate) =>
    PRESET_WIDGETS.every((key) => sameValue(widgetValue(node, key), presets[candidate][key])));
  return name ?? CUSTOM_PRESET;
}

/** The run line: live progress, the total time, or where it stopped. */
function runLine(run) {
  if (!run) return ["", ""];
  const seconds = ((run.end ?? performance.now()) - run.start) / 1000;
  switch (run.state) {
    case "starting":
      return [`starting · ${run.max} tokens`, "muted"];
    case "running": {
      const rated = run.value - run.firstValue;
      const rate = rated > 0 ? rated / ((performance.now() - run.firstTime) / 1000) : 0;
      return [formatRunning(run.value, run.max, rate), ""];
    }
    case "done":
      return [`token ${run.value} / ${run.max} · done in ${formatDuration(seconds)}`, "ok"];
    default:
      return [`stopped at token ${run.value} / ${run.max}`, "warn"];
  }
}

export function setupSampler(node, presets) {
  const names = Object.keys(presets);
  const presetPicker = addPickerWidget(node, "preset", [CUSTOM_PRESET, ...names], (name) => {
    const preset = presets[name];
    if (!preset) return;
    for (const key of PRESET_WIDGETS) setWidgetValue(node, key, preset[key]);
    refresh();
  }, "Sets steps, cfg, cfg_img, timesteps_shift, sampler, profile, use_norm and the size to a model's " +
     "recommended values (front-end only: not saved).");
  const sizePicker = addPickerWidget(node, "size", [CUSTOM_SIZE, ...TRAINED_SIZES.map(sizeLabel)], (entry) => {
    const size = sizeOf(entry);
    if (!size) return;
    setWidgetValue(node, "width", size[0]);
    setWidgetValue(node, "height", size[1]);
    refresh();
  }, "Sets width and height to one of the trained sizes of about 512x512 (front-end only: not saved).");
  const show = addTextPanel(node, "nextstep_status", 3);

  function refresh() {
    showPicked(presetPicker, matchingPreset(node, presets));
    showPicked(sizePicker, sizeEntry(widgetValue(node, "width"), widgetValue(node, "height")));
    const batch = widgetValue(node, "batch_size");
    const rows = batch * guidanceGroups(widgetValue(node, "cfg"), widgetValue(node, "cfg_img"), isEditing(node));
    const negative = presets[presetPicker.value]?.negative;
    show([
      runLine(node.nextstepRun),
      [`${tokenCount(node)} tokens · ${rows} guidance row${rows === 1 ? "" : "s"}`, node.nextstepRun ? "muted" : ""],
      [negative ? `negative prompt: ${negative}` : "", "muted"],
    ]);
    const modelSlot = node.inputs?.findIndex((input) => input.name === "model");
    if (modelSlot >= 0) node.getInputNode(modelSlot)?.nextstepRefresh?.();
    node.setDirtyCanvas?.(true, true);
  }

  onWidgetChange(node, SETTINGS, refresh);
  node.nextstepRefresh = refresh;
  node.nextstepTokens = () => tokenCount(node);
  refresh();
}

/** Follows the server's execution events and shows each NextStep Sampler's run on it. */
export function trackRuns(api, graph) {
  let current = null;  // the sampler node running now
  const redraw = (node) => node?.nextstepRefresh?.();

  function finish(state) {
    if (!current) return;
    const run = current.nextstepRun;
    run.state = state === "done" && run.value < run.max ? "stopped" : state;
    run.end = performance.now();
    redraw(current);
    current = null;
  }

  api.addEventListener("executing", ({ detail }) => {
    const id = detail == null ? null : String(detail);
    if (current && String(current.id) !== id) finish("done");
    const node = id == null ? null : graph().getNodeById(id);
    if (node?.comfyClass !== "NextStepSampler") return;
    const now = performance.now();
    node.nextstepRun = { state: "starting", start: now, value: 0, max: node.nextstepTokens(), firstTime: now,
      firstValue: 0 };
    current = node;
    redraw(node);
  });
  api.addEventListener("progress", ({ detail }) => {
    if (!current || String(detail.node) !== String(current.id)) return;
    const run = current.nextstepRun;
    if (run.state === "starting") Object.assign(run, { firstTime: performance.now(), firstValue: detail.value });
    Object.assign(run, { state: "running", value: detail.value, max: detail.max });
    redraw(current);
  });
  api.addEventListener("execution_success", () => finish("done"));
  api.addEventListener("execution_interrupted", () => finish("stopped"));
  api.addEventListener("execution_error", () => finish("stopped"));
}
