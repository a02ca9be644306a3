// The install's warnings for the Model Loader (GET /nextstep/doctor, asked once per page: the server times a tiny
// torch.compile the first time): each warning is keyed by the loader setting it concerns ("compile",
// "attention:flash_attn", "memory:int4", "dtype:bfloat16", ...; see nextstep_runtime/doctor/warnings.py), so a
// loader shows those of its chosen values only.

import { widgetValue } from "./widgets.js";

export const SETTING_WIDGETS = ["dtype", "attention", "fp8", "memory", "compile"];
let report = null;

/** The doctor report's warnings, fetched once; a failed request is asked again next time. */
export function installWarnings(api) {
  report ??= api.fetchApi("/nextstep/doctor").then(async (response) => {
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error ?? `HTTP ${response.status}`);
    return answer.warnings;
  }).catch((error) => {
    report = null;
    throw error;
  });
  return report;
}

/** The setting keys the loader's current widget values stand for. */
function chosenSettings(node) {
  const keys = SETTING_WIDGETS.filter((name) => !["fp8", "compile"].includes(name))
    .map((name) => `${name}:${widgetValue(node, name)}`);
  if (widgetValue(node, "fp8")) keys.push("fp8");
  if (widgetValue(node, "compile")) keys.push("compile");
  return keys;
}

/** The texts of the warnings that concern the loader's chosen settings. */
export function warningsFor(node, warnings) {
  const chosen = chosenSettings(node);
  return [...new Set(warnings.filter((warning) => chosen.includes(warning.setting)).map((warning) => warning.text))];
}
