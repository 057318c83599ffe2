// Stand-in for @daily-co/daily-js (about 250 kB minified), aliased at bundle
// time by build.sh. SmallWebRTCTransport only touches daily-js when it builds
// its default DailyMediaManager, i.e. when no `mediaManager` option is given;
// that default needs the internet anyway. Always pass a mediaManager
// (see gum_media_manager.js).
function unavailable() {
  throw new Error(
    "daily-js is not bundled in Parley's test bundle: pass a mediaManager " +
      "(PipecatSDK.GumMediaManager) to SmallWebRTCTransport"
  );
}
const Daily = {
  getCallInstance: () => undefined,
  createCallObject: unavailable,
};
export default Daily;
