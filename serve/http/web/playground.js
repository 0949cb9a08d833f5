// #/playground: chat with the served model, unsteered and steered side by side, both streaming.

import * as api from "./api.js";
import { fmt, h, saeSelect, statusLine, tokenLabel, withStatus } from "./dom.js";

const OPS = {
  add: { min: -200, max: 200, step: 0.5, start: 50, help: "x + v·d" },
  clamp: { min: -200, max: 200, step: 0.5, start: 0, help: "set the activation to v" },
  mul: { min: -5, max: 10, step: 0.1, start: 0, help: "multiply the activation by v" },
  h_bias: { min: -200, max: 200, step: 0.5, start: 10, help: "add v to the pre-activation" },
};

function summaryText(f) {
  const parts = [];
  if (f.explanation) parts.push(f.explanation);
  if (f.activating_tokens.length) parts.push(`fires on ${f.activating_tokens.map(tokenLabel).join(" ")}`);
  if (f.top_tokens.length) parts.push(`promotes ${f.top_tokens.map(tokenLabel).join(" ")}`);
  if (f.density !== null) parts.push(`density ${fmt(f.density)}`);
  return parts.join(" · ") || "no statistics";
}

class SteeringList {
  constructor() {
    this.entries = [];
    this.el = h("ul", { class: "steering", "aria-label": "Steering features" });
    this.empty = h("p", { class: "hint" }, "No features added: both columns answer alike. Search and add one above.");
  }

  add(sae, feature) {
    if (this.entries.some((e) => e.sae === sae && e.feature === feature)) return;
    const entry = { sae, feature, op: "add", value: OPS.add.start };
    this.entries.push(entry);
    this.render();
    this.el.querySelector(`[data-key="${sae}#${feature}"] select`).focus();
  }

  row(entry) {
    const name = `${entry.sae} #${entry.feature}`;
    const range = h("input", { type: "range", "aria-label": `Value slider for ${name}` });
    const number = h("input", { type: "number", class: "value", "aria-label": `Value for ${name}` });
    const setRange = () => {
      const op = OPS[entry.op];
      Object.assign(range, { min: op.min, max: op.max, step: op.step });
      range.value = entry.value;
      number.value = entry.value;
      number.step = "any";
    };
    range.addEventListener("input", () => { entry.value = Number(range.value); number.value = range.value; });
    number.addEventListener("input", () => {
      if (number.value !== "" && Number.isFinite(Number(number.value))) {
        entry.value = Number(number.value);
        range.value = number.value;
      }
    });
    const op = h("select", { "aria-label": `Op for ${name}`,
      onchange: (e) => { entry.op = e.target.value; entry.value = OPS[entry.op].start; setRange(); } },
      Object.entries(OPS).map(([k, o]) => h("option", { value: k, selected: k === entry.op, title: o.help }, k)));
    setRange();
    const remove = h("button", { type: "button", onclick: () => {
      this.entries = this.entries.filter((e) => e !== entry);
      this.render();
    } }, `Remove ${name}`);
    return h("li", { "data-key": `${entry.sae}#${entry.feature}` },
      h("a", { href: `#/sae/${encodeURIComponent(entry.sae)}/feature/${entry.feature}` }, name), op, range, number,
      remove);
  }

  render() {
    this.el.replaceChildren(...this.entries.map((e) => this.row(e)));
    this.empty.hidden = this.entries.length > 0;
  }

  spec() {
    return this.entries.map(({ sae, feature, op, value }) => ({ sae, feature, op, value }));
  }
}

class Transcript {
  constructor(title, id) {
    this.history = [];
    this.log = h("div", { class: "transcript", id, "aria-live": "polite" });
    this.el = h("section", { class: "column", "aria-label": title }, h("h2", {}, title), this.log);
  }

  message(role, text) {
    const body = h("div", { class: "text" }, text);
    this.log.append(h("div", { class: `msg ${role}` }, h("span", { class: "role" }, role), body));
    return body;
  }

  async ask(userText, request) {
    this.history.push({ role: "user", content: userText });
    this.message("user", userText);
    const body = this.message("assistant", "");
    body.classList.add("pending");
    let answer = "";
    try {
      await api.streamChat({ ...request, messages: this.history }, (delta) => {
        answer += delta;
        body.textContent = answer;
      });
      this.history.push({ role: "assistant", content: answer });
    } catch (err) {
      this.history.pop();
      body.textContent = answer ? `${answer} [stopped]` : "[no answer]";
      throw err;
    } finally {
      body.classList.remove("pending");
    }
  }

  clear() {
    this.history = [];
    this.log.replaceChildren();
  }
}

export async function playgroundView(main, params) {
  const status = statusLine();
  main.replaceChildren(h("h1", {}, "Steering playground"), status.el);
  const loaded = await withStatus(status, "SAEs", async () => [await api.saes(), await api.servedModel()]);
  if (!loaded) return;
  const [{ data: list }, model] = loaded;
  const chosen = list.some((s) => s.id === params.get("sae")) ? params.get("sae") : list[0] && list[0].id;

  const steering = new SteeringList();
  const select = saeSelect(list, chosen, "pg-sae");
  const query = h("input", { id: "pg-query", type: "search", placeholder: "index, token or explanation",
    autocomplete: "off" });
  const results = h("ul", { class: "results", "aria-label": "Matching features" });
  const searchStatus = statusLine();
  const search = async () => {
    results.replaceChildren();
    const found = await withStatus(searchStatus, "features",
      () => api.featureList(select.value, query.value, 20));
    if (!found) return;
    if (!found.data.length) searchStatus.el.textContent = `No feature of ${select.value} matches “${query.value}”.`;
    else if (found.total > found.data.length) {
      searchStatus.el.textContent = `Showing ${found.data.length} of ${found.total} matches.`;
    }
    results.replaceChildren(...found.data.map((f) => h("li", {},
      h("button", { type: "button", class: "add", "data-feature": f.id,
        onclick: () => steering.add(select.value, f.id) }, `Add #${f.id}`),
      h("span", { class: "summary" }, ` ${summaryText(f)}`))));
  };

  const prompt = h("textarea", { id: "pg-prompt", rows: 3, placeholder: "Ask something (Enter sends, Shift+Enter for a new line)" });
  const maxTokens = h("input", { id: "pg-max", type: "number", min: 1, max: 1024, value: 40 });
  const temperature = h("input", { id: "pg-temp", type: "number", min: 0, max: 2, step: 0.1, value: 0 });
  const send = h("button", { type: "submit", id: "pg-send" }, "Send");
  const chatStatus = statusLine();
  const plain = new Transcript("Unsteered", "pg-plain");
  const steered = new Transcript("Steered", "pg-steered");

  prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      prompt.form.requestSubmit();
    }
  });
  const chat = async (e) => {
    e.preventDefault();
    const text = prompt.value.trim();
    if (!text || send.disabled) return;
    const request = { model, max_tokens: Number(maxTokens.value), temperature: Number(temperature.value) };
    send.disabled = true;
    chatStatus.loading("both answers");
    prompt.value = "";
    const outcomes = await Promise.allSettled([
      plain.ask(text, { ...request, steering: [] }),
      steered.ask(text, { ...request, steering: steering.spec() }),
    ]);
    send.disabled = false;
    const failed = outcomes.find((o) => o.status === "rejected");
    if (failed) chatStatus.error(failed.reason);
    else chatStatus.clear();
    prompt.focus();
  };

  main.replaceChildren(
    h("h1", {}, "Steering playground"),
    status.el,
    h("form", { class: "row", role: "search", onsubmit: (e) => { e.preventDefault(); search(); } },
      h("label", { for: "pg-sae" }, "SAE"), select,
      h("label", { for: "pg-query" }, "Find a feature"), query,
      h("button", { type: "submit" }, "Search")),
    searchStatus.el,
    results,
    h("h2", {}, "Steering"),
    steering.empty,
    steering.el,
    h("form", { class: "chat", onsubmit: chat },
      h("label", { for: "pg-prompt" }, "Message"), prompt,
      h("div", { class: "row" },
        h("label", { for: "pg-max" }, "Max tokens"), maxTokens,
        h("label", { for: "pg-temp" }, "Temperature"), temperature,
        send,
        h("button", { type: "button", onclick: () => { plain.clear(); steered.clear(); chatStatus.clear(); } },
          "Clear chat"))),
    chatStatus.el,
    h("div", { class: "columns" }, plain.el, steered.el),
  );
  steering.render();
  const feature = params.get("feature");
  if (chosen && feature !== null && /^\d+$/.test(feature)) steering.add(chosen, Number(feature));
}
