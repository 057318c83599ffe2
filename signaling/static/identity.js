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

// The token, created on first use: 32 random bytes, base64url without padding (43 characters).
export function userToken() {
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
