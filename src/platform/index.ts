/**
 * The host platform: which hosts run VMs, and the installed platform
 * package that carries the prebuilt agent, kernel and busybox.
 */

export { SUPPORTED_HOSTS, assertSupportedHost, hostPlatform, unsupportedHostReason } from "./host.js";
export {
  PLATFORM_ASSETS_FORMAT,
  isCheckout,
  mainPackageRoot,
  mainPackageVersion,
  platformAssets,
  platformPackageName,
  platformPackageStatus,
  type PlatformAssets,
  type PlatformPackageStatus,
} from "./package.js";
