// Small helpers over a LiteGraph node's widgets, shared by the NextStep node extensions.

export function findWidget(node, name) {
  return node.widgets?.find((widget) => widget.name === name);
}

export function widgetValue(node, name) {
  return findWidget(node, name)?.value;
}

/** Sets a widget as if the user had (its own callback runs: rounding, linked widgets). */
export function setWidgetValue(node, name, value) {
  const widget = findWidget(node, name);
  if (!widget) return;
  widget.value = value;
  widget.callback?.(widget.value);
}

/** Runs `listener` after any of the named widgets changes through its callback. */
export function onWidgetChange(node, names, listener) {
  for (const widget of node.widgets ?? []) {
    if (!names.includes(widget.name)) continue;
    const original = widget.callback;
    widget.callback = function (...args) {
      const result = original?.apply(this, args);
      listener();
      return result;
    };
  }
}

let showing = false;  // a picker is being set to show the current values, not picked by the user

/** Adds a front-end-only combo (after the node's real widgets: widgets_values are positional); neither
 * the saved workflow nor the API prompt carries it. `onPick` runs when the user picks an entry. */
export function addPickerWidget(node, name, values, onPick, tooltip) {
  const widget = node.addWidget("combo", name, values[0], (value) => showing || onPick(value),
    { values, serialize: false });
  widget.serialize = false;
  widget.tooltip = tooltip;
  return widget;
}

/** Shows `value` in a picker without acting on it. Through the widget's callback, since Nodes 2.0 wraps it
 * to update what it displays. */
export function showPicked(widget, value) {
  if (widget.value === value) return;
  showing = true;
  try {
    widget.value = value;
    widget.callback?.(value);
  } finally {
    showing = false;
  }
}
