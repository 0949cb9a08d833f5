// Element building without innerHTML (token texts and explanations are data, never markup), and the
// loading / error states every view shares.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "class") el.className = value;
    else if (name === "style") Object.assign(el.style, value);
    else if (name in el && typeof value !== "string") el[name] = value;
    else el.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

/** A region that shows "Loading…", then either content or the API's error in plain words. */
export function statusLine() {
  const el = h("p", { class: "status", role: "status", "aria-live": "polite" });
  return {
    el,
    loading(what) {
      el.className = "status loading";
      el.textContent = `Loading ${what}…`;
    },
    error(err) {
      el.className = "status error";
      el.setAttribute("role", "alert");
      el.textContent = `Error: ${err.message}`;
    },
    clear() {
      el.className = "status";
      el.setAttribute("role", "status");
      el.textContent = "";
    },
  };
}

/** Run `work`, showing its loading state and any error on `status`; returns its result or null on error. */
export async function withStatus(status, what, work) {
  status.loading(what);
  try {
    const result = await work();
    status.clear();
    return result;
  } catch (err) {
    status.error(err);
    return null;
  }
}

/** Visible form of whitespace inside a token (newlines and tabs would otherwise vanish or break lines). */
export function tokenLabel(text) {
  return text.replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/^ /, "·") || "∅";
}

export function fmt(value, digits = 3) {
  if (value === null || value === undefined) return "—";
  if (typeof value !== "number") return String(value);
  if (value !== 0 && Math.abs(value) < 10 ** -digits) return value.toExponential(2);
  return Number(value.toFixed(digits)).toString();
}

export function percent(value) {
  return value === null || value === undefined ? "—" : `${fmt(100 * value, 2)}%`;
}

export function saeSelect(list, selected, id) {
  return h("select", { id }, list.map((s) =>
    h("option", { value: s.id, selected: s.id === selected }, `${s.id} (${s.d_sae} features, ${s.hook_point})`)));
}
