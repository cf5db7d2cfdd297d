# System packages the build and the tests need, installed only where missing
# (apt-get, non-interactive). Sourced by scripts/test and by .ci/run, which
# needs cmake for the codec crates before its lint step builds anything.
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi; }

install_system_packages() {
  missing=()
  [ -x /usr/bin/storescu ] || missing+=(dcmtk)
  command -v dciodvfy >/dev/null || missing+=(dicom3tools)
  command -v gdcmconv >/dev/null || missing+=(libgdcm-tools)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
  command -v cmake >/dev/null || missing+=(cmake)
  command -v curl >/dev/null || missing+=(curl)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v chromium >/dev/null || missing+=(chromium)
  command -v node >/dev/null || missing+=(nodejs)
  command -v npm >/dev/null || missing+=(npm)
  if [ ${#missing[@]} -gt 0 ]; then
    printf '[packages] apt-get install %s\n' "${missing[*]}" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}
