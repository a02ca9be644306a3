// The install's warnings for the Model Loader (GET /nextstep/doctor?device=..&warnings_only=1: the run device's part of
// the report only, asked once per page and device; the server times a tiny torch.compile the first time): each
// warning is keyed by the loader setting it concerns ("compile", "attention:flash_attn", "memory:int4",
// "dtype:bfloat16", ...; see nextstep_runtime/doctor/warnings.py), so a loader shows those of its chosen values only.

import { widgetValue } from "./widgets.js";

export const SETTING_WIDGETS = ["dtype", "attention", "fp8", "memory", "compile", "device"];
const reports = new Map();  // the loader's device text -> the warnings' promise

/** The doctor report's warnings for the loader's `device` text, fetched once per device; a failed request is
 * asked again next time. */
export function installWarnings(api, device) {
  if (!reports.has(device)) {
    reports.set(device, api.fetchApi(`/nextstep/doctor?device=${encodeURIComponent(device)}&warnings_only=1`)
      .then(async (response) => {
        const answer = await response.json();
        if (!response.ok) throw new Error(answer.error ?? `HTTP ${response.status}`);
        return answer.warnings;
      }).catch((error) => {
        reports.delete(device);
        throw error;
      }));
  }
  return reports.get(device);
}

/** The setting keys the loader's current widget values stand for. */
function chosenSettings(node) {
  const keys = ["dtype", "attention", "memory"].map((name) => `${name}:${widgetValue(node, name)}`);
  if (widgetValue(node, "fp8")) keys.push("fp8");
  if (widgetValue(node, "compile")) keys.push("compile");
  return keys;
}

/** The texts of the warnings that concern the loader's chosen settings. */
export function warningsFor(node, warnings) {
  const chosen = chosenSettings(node);
  return [...new Set(warnings.filter((warning) => chosen.includes(warning.setting)).map((warning) => warning.text))];
}
