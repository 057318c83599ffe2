#!/bin/sh
# Rebuild tests/web/pipecat_bundle.js from the pinned npm packages.
# Needs Node >= 18 and npm; CI does not run this (the bundle is committed).
set -eu
cd "$(dirname "$0")"
npm ci --no-audit --no-fund
npx esbuild entry.js \
  --bundle --minify --format=iife --target=es2020 \
  --alias:@daily-co/daily-js=./daily_stub.js \
  --legal-comments=eof \
  --banner:js="/* Parley test bundle: @pipecat-ai/client-js $(node -p 'require("./package.json").dependencies["@pipecat-ai/client-js"]') + @pipecat-ai/small-webrtc-transport $(node -p 'require("./package.json").dependencies["@pipecat-ai/small-webrtc-transport"]') (BSD-2-Clause, Daily). Built by tests/web/pipecat/build.sh; do not edit. */" \
  --outfile=../pipecat_bundle.js
ls -l ../pipecat_bundle.js
