// Plain formatting of the numbers the NextStep nodes show (no ComfyUI imports, so they read on their own).

/** Seconds as m:ss, or h:mm:ss from an hour on. */
export function formatDuration(seconds) {
  const total = Math.max(0, Math.round(seconds));
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = String(total % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${s}` : `${m}:${s}`;
}

/** Bytes as GB with one decimal (the unit of the memory advice), small sizes in MB or kB. */
export function formatBytes(bytes) {
  if (bytes >= 1e9) return `${(bytes / 1e9).toFixed(1)} GB`;
  if (bytes >= 1e6) return `${(bytes / 1e6).toFixed(bytes < 1e8 ? 1 : 0)} MB`;
  return `${Math.round(bytes / 1e3)} kB`;
}

/** "token 312 / 1024 · 5.1 tok/s · 2:26 left"; the rate and time left once a rate is known. */
export function formatRunning(done, total, tokensPerSecond) {
  const parts = [`token ${done} / ${total}`];
  if (tokensPerSecond > 0) {
    parts.push(`${tokensPerSecond.toFixed(1)} tok/s`, `${formatDuration((total - done) / tokensPerSecond)} left`);
  }
  return parts.join(" · ");
}
