// Calls to the sae-serve public HTTP API. Failures become ApiError carrying the service's error.message,
// so every view can state them in the service's own words.

const KEY_STORAGE = "sae-serve-api-key";

export class ApiError extends Error {}

export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = apiKey();
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

async function send(method, path, body) {
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: headers(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    throw new ApiError(`Cannot reach the service (${err.message}).`);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

async function errorOf(response) {
  let message = `The service answered ${response.status} ${response.statusText}.`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(message);
}

export async function getJson(path) {
  return (await send("GET", path)).json();
}

export async function postJson(path, body) {
  return (await send("POST", path, body)).json();
}

/** An object URL of an image the API serves behind the key (an <img src> cannot send the header). */
export async function imageUrl(path) {
  return URL.createObjectURL(await (await send("GET", path)).blob());
}

/** POST with stream=true; calls onDelta(text) per content delta of choice 0 until data: [DONE]. */
export async function streamChat(body, onDelta) {
  const response = await send("POST", "/v1/chat/completions", { ...body, stream: true });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(chunk.error.message);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) onDelta(delta.content);
      }
    }
  }
}

let modelName = null;

export async function servedModel() {
  if (modelName === null) modelName = (await getJson("/v1/models")).data[0].id;
  return modelName;
}

export const saes = () => getJson("/v1/saes");
export const saeCard = (id) => getJson(`/v1/saes/${encodeURIComponent(id)}`);
export const featureCard = (id, index, topN = 10) =>
  getJson(`/v1/saes/${encodeURIComponent(id)}/features/${index}?top_n=${topN}`);
export const featureList = (id, query, limit = 50) =>
  getJson(`/v1/saes/${encodeURIComponent(id)}/features?q=${encodeURIComponent(query)}&limit=${limit}`);
export const activations = (body) => postJson("/v1/activations", body);
export const plotUrl = (id, name) =>
  imageUrl(`/v1/saes/${encodeURIComponent(id)}/plots/${encodeURIComponent(name)}`);
