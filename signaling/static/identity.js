// The anonymous identity this browser keeps: a random, unguessable token in localStorage.
// The main page sends it with its offer; the history and report pages send it as a bearer token.

export const USER_TOKEN_KEY = "parley.userToken";

let memoryToken = null; // storage disabled (private mode): one identity for this page's lifetime

function base64url(bytes) {
  let binary = "";
  for (const b of bytes) binary += String.fromCharCode(b);
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function newToken() {
  return base64url(crypto.getRandomValues(new Uint8Array(32)));
}

// On a server with access control, the embedding application opens the page as
// /?room=R#token=<signed room token>. A fragment never reaches a server, its logs or a Referer;
// the token is kept for this tab only and taken out of the address bar.
const SIGNED_TOKEN_KEY = "parley.signedToken";

function signedToken() {
  const found = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  try {
    if (found) {
      sessionStorage.setItem(SIGNED_TOKEN_KEY, decodeURIComponent(found[1]));
      history.replaceState(null, "", location.pathname + location.search);
    }
    return sessionStorage.getItem(SIGNED_TOKEN_KEY);
  } catch {
    return found ? decodeURIComponent(found[1]) : null;
  }
}

// Taken at once, before anything else can read, bookmark or share the address.
signedToken();

// The room a signed token opens (its "room" claim), so that /#token=... alone is enough.
// Read, not verified: the server verifies; this only fills in the form.
export function signedRoom() {
  const token = signedToken();
  if (!token) return null;
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const room = JSON.parse(atob(payload + "=".repeat((4 - (payload.length % 4)) % 4))).room;
    return typeof room === "string" ? room : null;
  } catch {
    return null;
  }
}

// The token, created on first use: 32 random bytes, base64url without padding (43 characters).
// A signed room token, when the page was given one, stands in its place.
export function userToken() {
  const signed = signedToken();
  if (signed) return signed;
  try {
    let token = localStorage.getItem(USER_TOKEN_KEY);
    if (!token || !/^[A-Za-z0-9_-]{32,}$/.test(token)) {
      token = newToken();
      localStorage.setItem(USER_TOKEN_KEY, token);
    }
    return token;
  } catch {
    memoryToken ??= newToken();
    return memoryToken;
  }
}

export function authHeaders(extra = {}) {
  return { Authorization: `Bearer ${userToken()}`, ...extra };
}
