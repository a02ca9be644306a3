// A read-only text panel on a node, as a DOM widget: DOM widgets render on the classic canvas and in
// Nodes 2.0 alike (onDrawForeground is not called in Nodes 2.0). It is front-end only: neither the
// saved workflow (widgets_values) nor the API prompt carries it.

const LINE_HEIGHT = 16;
const PADDING = 24;  // the classic canvas gives a DOM widget 20 px less than its layout height

/** Adds the panel (after the node's real widgets, since widgets_values are positional) and returns a
 * function that shows `lines` in it, each [text, tone] with tone "", "ok", "warn" or "muted". */
export function addTextPanel(node, name, maxLines) {
  const element = document.createElement("div");
  element.className = "nextstep-panel";
  const widget = node.addDOMWidget(name, "nextstep-panel", element, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => undefined,
    setValue: () => {},
    getMinHeight: () => maxLines * LINE_HEIGHT + PADDING,
    getMaxHeight: () => maxLines * LINE_HEIGHT + PADDING,
  });
  widget.serialize = false;
  return (lines) => {
    element.replaceChildren(...lines.filter(([text]) => text).map(([text, tone]) => {
      const line = document.createElement("div");
      line.textContent = text;
      line.title = text;  // the whole line on hover, where it is cut short
      if (tone) line.dataset.tone = tone;
      return line;
    }));
  };
}

/** The panel's look, added once to the page. */
export function addPanelStyle() {
  const style = document.createElement("style");
  style.textContent = `
    .nextstep-panel { box-sizing: border-box; padding: 2px 8px; overflow: hidden;
      font: 12px/${LINE_HEIGHT}px sans-serif; color: var(--input-text, #ddd); }
    .nextstep-panel > div { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
    .nextstep-panel > div[data-tone="ok"] { color: #7bc47f; }
    .nextstep-panel > div[data-tone="warn"] { color: #e8a33d; }
    .nextstep-panel > div[data-tone="muted"] { opacity: 0.7; }`;
  document.head.append(style);
}
