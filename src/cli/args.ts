/**
 * Command-line parsing with Docker's habits: `-it` (bundled short flags),
 * `-e K=V` and `-eK=V`, `--name value` and `--name=value`, `--` ends the
 * options, and commands like `run` stop at their first positional (IMAGE) so
 * the guest command's own flags are left alone. Every failure is a
 * UsageError (exit 125, one line).
 */

/** Bad command line: printed as one line, exit status 125. */
export class UsageError extends Error {
  override get name(): string {
    return "UsageError";
  }
}

export interface OptionSpec {
  /** Long name without dashes. */
  readonly name: string;
  readonly short?: string;
  readonly type: "boolean" | "string";
  readonly multiple?: boolean;
  /** Placeholder shown in help (string options). */
  readonly arg?: string;
  readonly help: string;
  /** Other long names accepted. */
  readonly aliases?: readonly string[];
  /** Values offered by shell completion. */
  readonly choices?: readonly string[];
}

export interface CommandSpec {
  readonly name: string;
  /** One line: `run [OPTIONS] IMAGE [COMMAND [ARG...]]`. */
  readonly usage: string;
  readonly summary: string;
  /** More text after the options. */
  readonly details?: string;
  readonly options: readonly OptionSpec[];
  /** Options end at the first positional (the rest goes to positionals as is). */
  readonly stopAtPositional?: boolean;
  /** Sub-commands (`snapshots ls`), for help and completion. */
  readonly subcommands?: readonly string[];
}

export interface Parsed {
  readonly values: Record<string, string | boolean | string[] | undefined>;
  readonly positionals: string[];
  /** `--` was seen before any positional. */
  readonly dashDashFirst: boolean;
  readonly help: boolean;
}

export const HELP_OPTION: OptionSpec = { name: "help", short: "h", type: "boolean", help: "print this help and exit" };

export function parseCommand(spec: CommandSpec, args: readonly string[]): Parsed {
  const opts = [...spec.options, HELP_OPTION];
  const byLong = new Map<string, OptionSpec>();
  const byShort = new Map<string, OptionSpec>();
  for (const o of opts) {
    byLong.set(o.name, o);
    for (const a of o.aliases ?? []) byLong.set(a, o);
    if (o.short) byShort.set(o.short, o);
  }
  const values: Record<string, string | boolean | string[] | undefined> = {};
  const positionals: string[] = [];
  let dashDashFirst = false;
  const set = (o: OptionSpec, v: string | boolean) => {
    if (o.multiple) ((values[o.name] as string[] | undefined) ?? (values[o.name] = [])).push(v as string);
    else values[o.name] = v;
  };
  const cmd = `supermachine ${spec.name}`;
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === "--") {
      if (positionals.length === 0) dashDashFirst = true;
      positionals.push(...args.slice(i + 1));
      break;
    }
    if (a.startsWith("--")) {
      const eq = a.indexOf("=");
      const name = eq >= 0 ? a.slice(2, eq) : a.slice(2);
      const o = byLong.get(name);
      if (!o) throw new UsageError(`${cmd}: unknown flag --${name}; see \`${cmd} --help\``);
      if (o.type === "boolean") {
        if (eq >= 0) {
          const v = a.slice(eq + 1);
          if (v !== "true" && v !== "false") throw new UsageError(`${cmd}: --${name} takes no value (or =true/=false), got ${JSON.stringify(v)}`);
          set(o, v === "true");
        } else set(o, true);
      } else if (eq >= 0) set(o, a.slice(eq + 1));
      else {
        if (i + 1 >= args.length) throw new UsageError(`${cmd}: --${name} needs a value (${o.arg ?? "VALUE"})`);
        set(o, args[++i]!);
      }
      continue;
    }
    if (a.startsWith("-") && a.length > 1) {
      // Bundled short flags: -it, -e K=V, -eK=V, -m512.
      for (let j = 1; j < a.length; j++) {
        const o = byShort.get(a[j]!);
        if (!o) throw new UsageError(`${cmd}: unknown flag -${a[j]}${a.length > 2 ? ` (in ${a})` : ""}; see \`${cmd} --help\``);
        if (o.type === "boolean") {
          set(o, true);
          continue;
        }
        const rest = a.slice(j + 1);
        if (rest !== "") set(o, rest.startsWith("=") ? rest.slice(1) : rest);
        else {
          if (i + 1 >= args.length) throw new UsageError(`${cmd}: -${o.short} needs a value (${o.arg ?? "VALUE"})`);
          set(o, args[++i]!);
        }
        break;
      }
      continue;
    }
    positionals.push(a);
    if (spec.stopAtPositional) {
      positionals.push(...args.slice(i + 1));
      break;
    }
  }
  return { values, positionals, dashDashFirst, help: values.help === true };
}

/** The help text of one command. */
export function helpText(spec: CommandSpec): string {
  const lines = [`usage: supermachine ${spec.usage}`, "", spec.summary];
  const opts = [...spec.options, HELP_OPTION];
  if (opts.length) {
    lines.push("", "options:");
    const label = (o: OptionSpec) => `${o.short ? `-${o.short}, ` : "    "}--${o.name}${o.type === "string" ? ` ${o.arg ?? "VALUE"}` : ""}`;
    const w = Math.min(32, Math.max(...opts.map((o) => label(o).length)) + 2);
    for (const o of opts) {
      const l = label(o);
      lines.push(l.length + 2 > w ? `  ${l}\n  ${" ".repeat(w)}${o.help}` : `  ${l.padEnd(w)}${o.help}`);
    }
  }
  if (spec.details) lines.push("", spec.details);
  return lines.join("\n") + "\n";
}

/** "512", "512m", "1g", "1.5G" → MiB. */
export function parseMib(v: string, flag: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?$/i.exec(v.trim());
  if (!m) throw new UsageError(`${flag} expects a size like 512, 512m or 2g (MiB by default), got ${JSON.stringify(v)}`);
  const n = Number(m[1]);
  const unit = (m[2] ?? "").toLowerCase();
  const mib = unit === "k" ? n / 1024 : unit === "g" ? n * 1024 : unit === "t" ? n * 1024 * 1024 : n;
  if (!Number.isFinite(mib) || mib < 1) throw new UsageError(`${flag}: ${JSON.stringify(v)} is under 1 MiB`);
  return Math.round(mib);
}

/** "10g", "500m", "1024" (bytes) → bytes. */
export function parseBytes(v: string, flag: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?$/i.exec(v.trim());
  if (!m) throw new UsageError(`${flag} expects a size like 500m or 10g, got ${JSON.stringify(v)}`);
  const mult = { "": 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 }[(m[2] ?? "").toLowerCase() as "" | "k" | "m" | "g" | "t"];
  return Math.round(Number(m[1]) * mult);
}

/** "9" (seconds), "1.5s", "500ms", "2m", "7d" → ms. `defaultUnit` applies to bare numbers. */
export function parseDurationMs(v: string, flag: string, defaultUnit: "s" | "d" = "s"): number {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$/.exec(v.trim());
  if (!m) throw new UsageError(`${flag} expects a duration like 10, 1.5s, 500ms, 2m, 12h or 7d, got ${JSON.stringify(v)}`);
  const unit = m[2] ?? defaultUnit;
  const mult = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }[unit as "ms" | "s" | "m" | "h" | "d"];
  return Math.round(Number(m[1]) * mult);
}

export function parseCount(v: string, flag: string, min: number, max: number): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < min || n > max) throw new UsageError(`${flag} expects a whole number in ${min}..${max}, got ${JSON.stringify(v)}`);
  return n;
}
