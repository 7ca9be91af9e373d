// chatd's HTTP API. The session cookie is HttpOnly: the browser sends and
// replaces it, the page only ever sees the identity in the JSON answers.

export class ApiError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

async function call(method, path, body) {
  let response;
  try {
    response = await fetch(path, {
      method,
      credentials: "same-origin",
      headers: body === undefined ? {} : { "Content-Type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    throw new ApiError("network", "Could not reach the server; check your connection.");
  }
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    throw new ApiError(data?.error ?? "http_error", data?.message ?? `The server answered ${response.status}.`);
  }
  return data;
}

/** {name, account, expires_at}; a fresh guest session if the cookie is gone, expired or revoked. */
export const getSession = () => call("GET", "/api/session");
export const register = (username, password) => call("POST", "/api/register", { username, password });
export const logIn = (username, password) => call("POST", "/api/login", { username, password });
export const logOut = () => call("POST", "/api/logout", {});
