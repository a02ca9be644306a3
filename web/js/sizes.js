// Image sizes of about the trained 512x512 area (262144 pixels, 1024 tokens of 16x16 pixels), as multiples
// of 16: the aspect-ratio buckets NextStep was trained on. Sizes far from this area were never trained.
export const TRAINED_SIZES = [
  [512, 512, "1:1"],
  [448, 576, "7:9"],
  [576, 448, "9:7"],
  [416, 624, "2:3"],
  [624, 416, "3:2"],
  [384, 672, "4:7"],
  [672, 384, "7:4"],
];

export const CUSTOM_SIZE = "custom";

/** The picker's label of a size, e.g. "448x576 (7:9)". */
export function sizeLabel([width, height, ratio]) {
  return `${width}x${height} (${ratio})`;
}

/** The picker entry of width x height, or CUSTOM_SIZE when it is not one of the trained sizes. */
export function sizeEntry(width, height) {
  const size = TRAINED_SIZES.find(([w, h]) => w === width && h === height);
  return size ? sizeLabel(size) : CUSTOM_SIZE;
}

/** [width, height] of a picker entry, or null for CUSTOM_SIZE. */
export function sizeOf(entry) {
  const size = TRAINED_SIZES.find((candidate) => sizeLabel(candidate) === entry);
  return size ? [size[0], size[1]] : null;
}
