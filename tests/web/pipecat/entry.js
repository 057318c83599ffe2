// Entry point of tests/web/pipecat_bundle.js: the unchanged Pipecat client SDK
// (client-js + small-webrtc-transport) plus a getUserMedia media manager,
// exposed as window.PipecatSDK. Rebuild with ./build.sh.
import {
  PipecatClient,
  RTVIEvent,
  RTVIMessage,
  RTVIMessageType,
  RTVI_PROTOCOL_VERSION,
  LogLevel,
  DeviceError,
  TransportStartError,
} from "@pipecat-ai/client-js";
import { SmallWebRTCTransport } from "@pipecat-ai/small-webrtc-transport";
import { GumMediaManager } from "./gum_media_manager.js";
import pkg from "./package.json";

const SDK = {
  PipecatClient,
  SmallWebRTCTransport,
  GumMediaManager,
  RTVIEvent,
  RTVIMessage,
  RTVIMessageType,
  RTVI_PROTOCOL_VERSION,
  LogLevel,
  DeviceError,
  TransportStartError,
  versions: {
    "@pipecat-ai/client-js": pkg.dependencies["@pipecat-ai/client-js"],
    "@pipecat-ai/small-webrtc-transport": pkg.dependencies["@pipecat-ai/small-webrtc-transport"],
  },
};

window.PipecatSDK = SDK;
export default SDK;
