/**
 * Renders ImageProgress: bars redrawn in place on a terminal (one row per
 * layer pull and unpack, then pack and the bake phases), plain lines at each
 * milestone otherwise (logs, CI, tests). Writes to stderr; no dependency.
 */

import type { ImageProgress } from "../image/resolve.js";

export function formatBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let v = n / 1024;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v < 10 ? v.toFixed(1) : Math.round(v)} ${units[i]}`;
}

function bar(done: number, total: number, width = 24): string {
  const f = total > 0 ? Math.max(0, Math.min(1, done / total)) : 0;
  const n = Math.round(f * width);
  return `[${"#".repeat(n)}${"-".repeat(width - n)}]`;
}

export class ProgressView {
  private readonly rows = new Map<string, string>();
  private drawn = 0;
  private timer: NodeJS.Timeout | undefined;
  private readonly said = new Set<string>();

  constructor(
    private readonly out: NodeJS.WriteStream,
    private readonly enabled: boolean,
    private readonly tty: boolean = out.isTTY === true && process.env.TERM !== "dumb",
  ) {}

  /** A plain message (a line of its own in both modes). */
  line(text: string): void {
    if (!this.enabled) return;
    if (this.tty) this.clear();
    this.out.write(`supermachine: ${text}\n`);
    if (this.tty) this.draw();
  }

  readonly onProgress = (p: ImageProgress): void => {
    if (!this.enabled) return;
    switch (p.stage) {
      case "pull": {
        const id = p.digest.slice(7, 19);
        if (p.phase === "cached") this.set(`pull:${p.layer}`, `layer ${p.layer + 1} ${id}  cached (${formatBytes(p.bytesTotal)})`, true);
        else
          this.set(
            `pull:${p.layer}`,
            this.tty
              ? `layer ${p.layer + 1} ${id}  ${bar(p.bytesDone, p.bytesTotal)} ${formatBytes(p.bytesDone)} / ${formatBytes(p.bytesTotal)}`
              : `layer ${p.layer + 1} ${id}  pulled ${formatBytes(p.bytesTotal)}`,
            p.bytesDone >= p.bytesTotal,
          );
        break;
      }
      case "unpack":
        this.set("unpack", this.tty ? `unpack layer ${p.layer + 1}/${p.layers}  ${formatBytes(p.bytes)}` : `unpack layer ${p.layer + 1}/${p.layers}`, !this.tty);
        break;
      case "pack":
        this.set("pack", "pack root filesystem (erofs)", true);
        break;
      case "rootfs-cached":
        this.set("pack", "root filesystem cached", true);
        break;
      case "bake":
        this.set("bake", p.phase === "done" ? `snapshot ${p.name} baked` : `bake ${p.name}: ${p.phase}${p.phase === "boot" ? " (first use of this image: one boot, later runs restore)" : ""}`, true);
        break;
      case "snapshot-cached":
        this.set("bake", `snapshot ${p.name} (cached)`, true);
        break;
    }
  };

  /**
   * Sets a row. On a terminal the rows are redrawn (throttled); otherwise a
   * line is printed when `milestone` is true, once per `once` key.
   */
  private set(key: string, text: string, milestone: boolean, once: string = key): void {
    if (!this.tty) {
      if (!milestone || this.said.has(`${once}|${text}`)) return;
      this.said.add(`${once}|${text}`);
      this.out.write(`supermachine: ${text}\n`);
      return;
    }
    this.rows.set(key, text);
    if (milestone) this.redraw();
    else if (!this.timer) {
      this.timer = setTimeout(() => this.redraw(), 100);
      this.timer.unref();
    }
  }

  private redraw(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    this.clear();
    this.draw();
  }

  private clear(): void {
    if (this.drawn > 0) this.out.write(`\x1b[${this.drawn}A\x1b[0J`);
    this.drawn = 0;
  }

  private draw(): void {
    const cols = this.out.columns || 80;
    let s = "";
    for (const t of this.rows.values()) s += `${t.length > cols - 1 ? `${t.slice(0, cols - 2)}…` : t}\n`;
    this.out.write(s);
    this.drawn = this.rows.size;
  }

  /** Leaves the last frame on screen and stops redrawing. */
  done(): void {
    if (this.timer) {
      clearTimeout(this.timer);
      this.timer = undefined;
      if (this.tty) this.redraw();
    }
    this.rows.clear();
    this.drawn = 0;
  }
}
