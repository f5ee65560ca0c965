/**
 * Guest output shown in host errors is stripped of control characters and
 * escape sequences (keeping \n and \t) and bounded.
 */

import assert from "node:assert/strict";
import { test } from "node:test";
import { AgentError, GuestDiedError } from "../src/errors.js";
import { GUEST_TEXT_MAX, guestText } from "../src/guest-text.js";

test("terminal escape sequences go whole: colours, cursor moves, OSC title, 8-bit CSI", () => {
  assert.equal(guestText("\u001b[31mred\u001b[0m \u001b[2J\u001b[Hhome"), "red home");
  assert.equal(guestText("a\u001b]0;pwned title\u0007b"), "ab");
  assert.equal(guestText("a\u001b]8;;http://x\u001b\\link\u001b]8;;\u001b\\b"), "alinkb");
  assert.equal(guestText("a\u009b31mb"), "ab");
  assert.equal(guestText("a\u001bcb"), "ab", "RIS (full terminal reset)");
});

test("control characters are removed; \\n and \\t stay; \\r\\n becomes \\n", () => {
  assert.equal(guestText("line1\r\nline2\n\tindented"), "line1\nline2\n\tindented");
  assert.equal(guestText("visible\rhidden"), "visiblehidden", "a lone \\r cannot overwrite the line");
  assert.equal(guestText("a\u0000b\u0007c\u0008d\u007fe\u0085f"), "abcdef");
  assert.equal(guestText("safe\u202egnp.exe"), "safegnp.exe", "bidi override");
  assert.equal(guestText("x\u2066y\u2069z\u2028w"), "xyzw");
  assert.equal(guestText("héllo ✓ 日本"), "héllo ✓ 日本", "printable Unicode is kept");
});

test("length is bounded: head for messages, tail for console tails", () => {
  const long = "a".repeat(100_000) + "END";
  const head = guestText(long);
  assert.equal(head.length, GUEST_TEXT_MAX);
  assert.ok(head.endsWith("…"));
  const tail = guestText(long, { maxChars: 100, keep: "tail" });
  assert.equal(tail.length, 100);
  assert.ok(tail.startsWith("…") && tail.endsWith("END"));
  // A megabyte of escapes is cut first (a cut escape leaves printable remnants at most).
  const noisy = guestText("\u001b[0m".repeat(1 << 18) + "ok", { keep: "tail" });
  assert.ok(noisy.endsWith("ok") && noisy.length <= 8, JSON.stringify(noisy));
  assert.doesNotMatch(noisy, /\u001b/);
  // A cut never leaves half a surrogate pair.
  const emoji = "😀".repeat(10);
  for (let n = 2; n < 12; n++) assert.doesNotMatch(guestText(emoji, { maxChars: n }), /[\ud800-\udbff](?![\udc00-\udfff])/);
});

test("GuestDiedError and AgentError sanitize what the guest said", () => {
  const died = new GuestDiedError("the guest failed to boot: \u001b[2Jevil\rmsg", "kernel panic\u001b]0;title\u0007\r\n" + "x".repeat(20_000) + "\nlast line");
  assert.doesNotMatch(died.message, /[\u0000-\u0008\u000b-\u001f\u007f]/);
  assert.ok(died.consoleTail.length <= 8192);
  assert.ok(died.consoleTail.endsWith("\nlast line"));
  assert.match(died.message, /the guest failed to boot: evilmsg\n--- guest console \(tail\) ---\n…x+\nlast line$/);
  const agent = new AgentError(2, "no such file\u001b[8m hidden \u001b[0m" + "y".repeat(10_000));
  assert.doesNotMatch(agent.message, /\u001b/);
  assert.ok(agent.message.length <= GUEST_TEXT_MAX);
  assert.equal(agent.code, "ERR_SM_AGENT");
});
