/**
 * Text that comes from the guest (its console, agent error messages, boot
 * errors) is shown in host error messages, logs and terminals. The guest is
 * hostile: such text could carry terminal escape sequences (retitle or
 * rewrite the user's terminal, fake prompts, hide lines with \r), Unicode
 * bidirectional overrides, or megabytes of noise. {@link guestText} makes it
 * safe to print: control characters are removed except \n and \t (a \r\n
 * line end becomes \n), escape sequences go whole, and the length is bounded.
 */

/** Default bound of one piece of guest text, in UTF-16 code units. */
export const GUEST_TEXT_MAX = 4096;

// ESC-initiated sequences: CSI (ESC [ … final), OSC/DCS/SOS/PM/APC (ESC ] P X ^ _ … BEL or ST), and two-char escapes.
// eslint-disable-next-line no-control-regex
const ESCAPES = /\u001b(?:\[[0-?]*[ -/]*[@-~]?|[\]PX^_][^\u0007\u001b]*(?:\u0007|\u001b\\)?|[ -/]*[0-~]?)|\u009b[0-?]*[ -/]*[@-~]?/g;
// C0 controls but \t and \n, DEL, C1 controls, bidi embeddings/overrides/isolates, line/paragraph separators.
// eslint-disable-next-line no-control-regex
const CONTROLS = /[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029\ufeff]/g;

/** Options of {@link guestText}. */
export interface GuestTextOptions {
  /** Longest result (a "…" marks the cut). @default 4096 */
  readonly maxChars?: number;
  /** Which end to keep when cutting: "tail" for console tails. @default "head" */
  readonly keep?: "head" | "tail";
}

/**
 * Makes guest-supplied text safe to show: strips control characters (keeps
 * \n and \t) and escape sequences, and bounds the length.
 */
export function guestText(text: string, options: GuestTextOptions = {}): string {
  const max = options.maxChars ?? GUEST_TEXT_MAX;
  // Bound before the regexes, with slack for what they remove.
  let s = text.length > max * 4 ? (options.keep === "tail" ? text.slice(-max * 4) : text.slice(0, max * 4)) : text;
  s = s.replace(/\r\n/g, "\n").replace(ESCAPES, "").replace(CONTROLS, "");
  // A lone surrogate left by a cut is dropped too.
  s = s.replace(/[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g, "");
  if (s.length <= max) return s;
  if (options.keep === "tail") {
    const cut = s.slice(s.length - max + 1);
    return `…${/^[\udc00-\udfff]/.test(cut) ? cut.slice(1) : cut}`;
  }
  const cut = s.slice(0, max - 1);
  return `${/[\ud800-\udbff]$/.test(cut) ? cut.slice(0, -1) : cut}…`;
}
