// Every request the web app makes goes through here: the key as a Bearer token, and OpenAI's error object
// turned into an Error whose message a person can read. Paths are relative ("v1/models", no leading
// slash) so the app also works behind a proxy that serves Tunery under a sub-path.

const KEY = "tunery.key";

export function getKey() {
  return sessionStorage.getItem(KEY) || localStorage.getItem(KEY) || "";
}

// sessionStorage by default: the key is gone when the tab closes. "Remember me" puts it in localStorage,
// which every tab of this origin can read; the login page says so.
export function setKey(key, remember) {
  clearKey();
  (remember ? localStorage : sessionStorage).setItem(KEY, key);
}

export function clearKey() {
  sessionStorage.removeItem(KEY);
  localStorage.removeItem(KEY);
}

export class ApiError extends Error {
  constructor(status, message, code = null, param = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.param = param;
  }
}

async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: a proxy's error page, say
  }
  const error = body && typeof body === "object" ? body.error : null;
  const message =
    error && error.message ? error.message : `The server answered ${response.status} ${response.statusText}.`;
  const failure = new ApiError(response.status, message, error?.code ?? null, error?.param ?? null);
  if (response.status === 401) {
    // a revoked key, or a server restarted on another data directory: the app goes back to the login page
    window.dispatchEvent(new CustomEvent("tunery:unauthorized", { detail: failure }));
  }
  return failure;
}

async function send(path, { method = "GET", body, signal, key } = {}) {
  const headers = { Authorization: `Bearer ${key ?? getKey()}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "Cannot reach the Tunery server. Is `tunery serve` still running?");
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

/** JSON from the API (or text, for text responses such as the model card). */
export async function api(path, options = {}) {
  const response = await send(path, options);
  const type = response.headers.get("content-type") || "";
  return type.includes("application/json") ? response.json() : response.text();
}

/** The `chat.completion.chunk` objects of a streamed chat completion, as they arrive (server-sent events). */
export async function* streamChat(body, signal) {
  const response = await send("v1/chat/completions", {
    method: "POST",
    body: { ...body, stream: true, stream_options: { include_usage: true } },
    signal,
  });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      // events end with a blank line; a read may end mid-event, so the tail waits for the next read
      let end;
      while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
        const data = event
          .split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart())
          .join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error)
          throw new ApiError(500, chunk.error.message || "The stream failed.", chunk.error.code);
        yield chunk;
      }
    }
  } finally {
    reader.cancel().catch(() => {}); // a caller that stops early closes the connection too
  }
}
