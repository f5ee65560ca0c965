/** The VM network: a host-side IPv4 stack per VM, with an egress policy. */
export { NetworkStack, GUEST_NETWORK, type NetworkStats, type NetworkDeniedEvent, type NetworkStackOptions } from "./stack.js";
export { compilePolicy, decideConnect, decideName, specialRange, type NetworkPolicy, type NetworkOption, type CompiledPolicy, type Decision } from "./policy.js";
