// Requests to the desk's server: JSON in and out; every change carries the token in a header (CSRF guard).

const TOKEN = document.querySelector('meta[name="wsi-il-token"]').content;

export class ApiError extends Error {
  constructor(text, status) {
    super(text);
    this.status = status;
  }
}

async function answer(response) {
  const type = response.headers.get("content-type") || "";
  const body = type.includes("application/json") ? await response.json() : { text: await response.text() };
  if (!response.ok) {
    throw new ApiError(body.text || body.error || `${response.status}`, response.status);
  }
  return body;
}

export async function get(path) {
  return answer(await fetch(path, { credentials: "same-origin" }));
}

export async function post(path, data = {}) {
  return answer(await fetch(path, {
    method: "POST",
    credentials: "same-origin",
    headers: { "content-type": "application/json", "x-wsi-il-token": TOKEN },
    body: JSON.stringify(data),
  }));
}

export const enc = encodeURIComponent;
