# Sourced by scripts/setup.sh, scripts/check_installs.sh and scripts/asan.sh: compile
# through ccache when it is installed, no compiler was chosen (CXX/CC unset) and its cache
# directory is writable. The cache is ccache's own (CCACHE_DIR, else ~/.cache/ccache), keyed
# without the checkout's path (CCACHE_BASEDIR=/, CCACHE_NOHASHDIR), so setup.sh's build fills
# what every install path's rebuild of the same sources hits (measured: the editable install
# path 99 s cold, 44 s warm, on 2 cores), and a second checkout of the same sources (a CI
# clone) hits it too. ccache returns an object only for the same preprocessed source and
# flags, so a hit is the compile it replaces.
# Set SPARSEKERN_NO_CCACHE=1 to compile without it.
# Usage: . scripts/ccache_env.sh  (sets SPARSEKERN_CCACHE_NOTE: one line saying which)
_sk_ccache_dir="${CCACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ccache}"
if [ -z "${SPARSEKERN_NO_CCACHE:-}" ] && [ -z "${CXX:-}" ] && [ -z "${CC:-}" ] \
   && command -v ccache >/dev/null 2>&1 && [ -x /usr/lib/ccache/c++ ] \
   && mkdir -p "$_sk_ccache_dir" 2>/dev/null && [ -w "$_sk_ccache_dir" ]; then
  export CXX=/usr/lib/ccache/c++ CC=/usr/lib/ccache/cc
  export CCACHE_DIR="$_sk_ccache_dir" CCACHE_BASEDIR=/ CCACHE_NOHASHDIR=1
  SPARSEKERN_CCACHE_NOTE="compiling through ccache ($CCACHE_DIR)"
else
  SPARSEKERN_CCACHE_NOTE="compiling without ccache (${CXX:-${CC:-not installed, its directory not writable, or SPARSEKERN_NO_CCACHE set}})"
fi
unset _sk_ccache_dir
