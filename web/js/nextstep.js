// The NextStep extension: presets, trained sizes and live token progress on NextStep Sampler, the memory
// plan on NextStep Model Loader. Everything it adds is front-end only: saved workflows and API prompts are
// the same with and without it.

import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { setupLoader } from "./loader_plan.js";
import { setupSampler, trackRuns } from "./sampler.js";
import { addPanelStyle } from "./text_widget.js";

let presets = {};
const MIN_WIDTH = { NextStepSampler: 400, NextStepModelLoader: 360 };  // room for the longest preset and advice

/** Grows a node to hold its widgets (the panels added here, or a saved size from before them); never shrinks
 * it, so a workflow laid out with room for the panels keeps its saved size. */
function fitWidgets(node) {
  const [computed, height] = node.computeSize();
  const width = Math.max(computed, MIN_WIDTH[node.comfyClass]);
  if (width > node.size[0] || height > node.size[1]) {
    node.setSize([Math.max(width, node.size[0]), Math.max(height, node.size[1])]);
  }
}

function refreshAll() {
  for (const node of app.graph?.nodes ?? []) node.nextstepRefresh?.();
}

app.registerExtension({
  name: "NextStep.Nodes",
  async init() {
    addPanelStyle();
    try {
      const response = await api.fetchApi("/nextstep/presets");
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      presets = await response.json();
    } catch (error) {
      console.warn(`NextStep: presets unavailable (${error.message}); the preset picker stays empty`);
    }
  },
  setup() {
    trackRuns(api, () => app.graph);
    api.addEventListener("graphChanged", refreshAll);
  },
  nodeCreated(node) {
    if (node.comfyClass === "NextStepSampler") setupSampler(node, presets);
    else if (node.comfyClass === "NextStepModelLoader") setupLoader(node, api);
    else return;
    fitWidgets(node);
  },
  loadedGraphNode(node) {
    if (!node.nextstepRefresh) return;
    fitWidgets(node);
    node.nextstepRefresh();  // the saved widget values arrive after nodeCreated
  },
});
