/**
 * The Internet checksum (RFC 1071): the ones' complement of the ones'
 * complement sum of 16-bit big-endian words.
 */

/** Adds `buf[start..end)` to a running 32-bit sum (not yet folded). */
export function sumWords(buf: Uint8Array, start: number, end: number, sum = 0): number {
  let i = start;
  // Four bytes at a time: two words per step, folded often enough to stay
  // within the 53 bits a double holds exactly.
  const stop4 = end - ((end - start) & 3);
  let acc = 0;
  let n = 0;
  for (; i < stop4; i += 4) {
    acc += ((buf[i]! << 8) | buf[i + 1]!) + ((buf[i + 2]! << 8) | buf[i + 3]!);
    if (++n === 8192) {
      sum += acc;
      acc = 0;
      n = 0;
      sum = (sum & 0xffff) + Math.floor(sum / 65536);
    }
  }
  sum += acc;
  if (i + 1 < end) {
    sum += (buf[i]! << 8) | buf[i + 1]!;
    i += 2;
  }
  if (i < end) sum += buf[i]! << 8;
  return sum;
}

/** Folds a running sum into the final 16-bit checksum value. */
export function finish(sum: number): number {
  while (sum > 0xffff) sum = (sum & 0xffff) + Math.floor(sum / 65536);
  return ~sum & 0xffff;
}

export function checksum(buf: Uint8Array, start = 0, end = buf.length): number {
  return finish(sumWords(buf, start, end));
}

/** Sum of the IPv4 pseudo-header for TCP/UDP checksums. */
export function pseudoHeaderSum(src: Uint8Array, dst: Uint8Array, protocol: number, length: number): number {
  return ((src[0]! << 8) | src[1]!) + ((src[2]! << 8) | src[3]!) + ((dst[0]! << 8) | dst[1]!) + ((dst[2]! << 8) | dst[3]!) + protocol + length;
}
