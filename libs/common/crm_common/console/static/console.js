// The CRM console: one page, views chosen by the URL hash, data from /api/<service>/v1/... (the
// console's proxy, which forwards the ops key typed on the login page). Plain JavaScript, SVG charts.
"use strict";

const KEY_STORE = "crm.console.key";
const view = document.getElementById("view");

// -- API ---------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(`${status} ${e.code || "error"}: ${e.message || "request failed"}`);
    this.status = status;
    this.code = e.code;
  }
}

function key() { return sessionStorage.getItem(KEY_STORE); }

async function api(service, path, { method = "GET", body } = {}) {
  const headers = { Authorization: `Bearer ${key()}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(`/api/${service}${path}`, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  const doc = text ? JSON.parse(text) : null;
  if (r.status === 401) { sessionStorage.removeItem(KEY_STORE); location.hash = "#/login"; }
  if (!r.ok) throw new ApiError(r.status, doc);
  return doc;
}

// An answer or null when the thing does not exist (a customer without a loyalty account).
async function maybe(service, path) {
  try { return await api(service, path); } catch (e) { if (e.status === 404) return null; throw e; }
}

// -- DOM and formatting ------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

// Fixed decimals with thousands separators; the tests format the API's figures the same way.
function fmt(x, digits = 2) {
  if (x === null || x === undefined || x === "") return "—";
  const n = Number(x);
  if (!Number.isFinite(n)) return String(x);
  const [int, frac] = Math.abs(n).toFixed(digits).split(".");
  const grouped = int.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  return (n < 0 && Number(Math.abs(n).toFixed(digits)) !== 0 ? "-" : "") + grouped + (frac ? "." + frac : "");
}
const int = (x) => fmt(x, 0);
const pct = (x) => (x === null || x === undefined ? "—" : fmt(100 * Number(x), 1) + "%");
const day = (iso) => (iso ? String(iso).slice(0, 10) : "—");
const when = (iso) => (iso ? String(iso).replace("T", " ").slice(0, 16) : "—");
const interval = (iv, f = fmt) => (iv ? `${f(iv.estimate)} [${f(iv.low)}, ${f(iv.high)}]` : "—");

function state(s) { return h("span", { class: `state ${s}`, "data-k": "state" }, s); }

function card(label, value, k, extra) {
  return h("div", { class: "card" }, h("div", { class: "label" }, label),
    h("div", { class: "value", "data-k": k }, value), extra ? h("div", { class: "extra" }, extra) : null);
}

// A table; `cols` are [header, cell(row), {num, k}] and each cell gets data-k for the tests.
function table(cols, rows, k) {
  return h("table", { "data-k": k },
    h("thead", {}, h("tr", {}, cols.map(([title, , o = {}]) => h("th", { class: o.num ? "num" : null }, title)))),
    h("tbody", {}, rows.length ? rows.map((row) => h("tr", { "data-row": row.__id ?? null },
      cols.map(([, cell, o = {}]) => h("td", { class: o.num ? "num" : null, "data-k": o.k || null }, cell(row))))) :
      h("tr", {}, h("td", { colspan: cols.length, class: "muted" }, "none"))));
}

function errorBox(e) { return h("div", { class: "error", "data-k": "error" }, e.message || String(e)); }

// -- charts (SVG) ------------------------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";
function s(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

// Lines over shared x labels: series = [{name, color, values: [number|null]}].
function lineChart(labels, series, { yFormat = (v) => fmt(v), height = 220, k, xNumeric = false } = {}) {
  const W = 640, H = height, L = 56, R = 12, T = 10, B = 28;
  const all = series.flatMap((x) => x.values).filter((v) => v !== null && v !== undefined).map(Number);
  const max = Math.max(1e-9, ...all), min = Math.min(0, ...all);
  const xs = xNumeric ? labels.map(Number) : labels.map((_, i) => i);
  const xmin = Math.min(...xs), xmax = Math.max(...xs);
  const X = (i) => L + (xmax === xmin ? (W - L - R) / 2 : ((xs[i] - xmin) / (xmax - xmin)) * (W - L - R));
  const Y = (v) => T + (1 - (v - min) / (max - min || 1)) * (H - T - B);
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, width: "100%", "data-k": k || "chart" });
  for (let g = 0; g <= 4; g++) {
    const v = min + ((max - min) * g) / 4;
    svg.append(s("line", { class: "axis", x1: L, x2: W - R, y1: Y(v), y2: Y(v) }),
      s("text", { x: L - 6, y: Y(v) + 4, "text-anchor": "end" }, yFormat(v)));
  }
  const step = Math.max(1, Math.ceil(labels.length / 8));
  labels.forEach((lab, i) => { if (i % step === 0 || i === labels.length - 1) svg.append(s("text", { x: X(i), y: H - 8, "text-anchor": "middle" }, lab)); });
  for (const line of series) {
    const pts = line.values.map((v, i) => (v === null || v === undefined ? null : [X(i), Y(Number(v))])).filter(Boolean);
    if (pts.length) svg.append(s("polyline", { points: pts.map((p) => p.join(",")).join(" "), fill: "none", stroke: line.color, "stroke-width": 2 }));
    line.values.forEach((v, i) => {
      if (v === null || v === undefined) return;
      svg.append(s("circle", { cx: X(i), cy: Y(Number(v)), r: 3, fill: line.color, "data-series": line.name, "data-value": v },
        s("title", {}, `${line.name} ${labels[i]}: ${yFormat(v)}`)));
    });
  }
  const legend = h("div", { class: "legend" }, series.map((x) => h("span", {}, h("i", { style: `background:${x.color}` }), x.name)));
  return h("div", {}, legend, svg);
}

function barChart(labels, values, { color = "#2f6fde", yFormat = (v) => fmt(v), k } = {}) {
  const W = 640, H = 220, L = 64, R = 12, T = 10, B = 28;
  const max = Math.max(1e-9, ...values.map(Number));
  const bw = (W - L - R) / Math.max(1, labels.length);
  const Y = (v) => T + (1 - v / max) * (H - T - B);
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, width: "100%", "data-k": k || "chart" });
  for (let g = 0; g <= 4; g++) {
    const v = (max * g) / 4;
    svg.append(s("line", { class: "axis", x1: L, x2: W - R, y1: Y(v), y2: Y(v) }), s("text", { x: L - 6, y: Y(v) + 4, "text-anchor": "end" }, yFormat(v)));
  }
  labels.forEach((lab, i) => {
    const v = Number(values[i]);
    svg.append(s("rect", { x: L + i * bw + bw * 0.15, y: Y(v), width: bw * 0.7, height: Math.max(0, H - B - Y(v)), fill: color, "data-value": values[i] },
      s("title", {}, `${lab}: ${yFormat(v)}`)),
    (i % Math.max(1, Math.ceil(labels.length / 8)) === 0 ? s("text", { x: L + i * bw + bw / 2, y: H - 8, "text-anchor": "middle" }, lab) : ""));
  });
  return svg;
}

// -- segment rules, readably -------------------------------------------------------------------

const OPS = { ">=": "≥", "<=": "≤", "!=": "≠", "==": "=", in: "is one of", not_in: "is not one of" };
function ruleText(node, depth = 0) {
  if (!node || typeof node !== "object") return String(node);
  const pad = "  ".repeat(depth);
  const join = (word, parts) => parts.map((p) => ruleText(p, depth + 1)).join(`\n${pad}${word} `);
  if (node.all) return node.all.length === 1 ? ruleText(node.all[0], depth) : `all of:\n${pad}    ${join("and", node.all)}`;
  if (node.any) return node.any.length === 1 ? ruleText(node.any[0], depth) : `any of:\n${pad}    ${join("or", node.any)}`;
  if (node.not) return `not (${ruleText(node.not, depth + 1)})`;
  const value = Array.isArray(node.value) ? node.value.join(", ") : JSON.stringify(node.value);
  const op = OPS[node.op] || node.op;
  if (node.attr) return `${node.attr} ${op} ${value}`;
  if (node.purchases) {
    const p = node.purchases;
    const bits = [`${(p.measure || "orders").replace("_", " ")} of purchases`];
    if (p.category) bits.push(`in ${[].concat(p.category).join(", ")}`);
    if (p.sku) bits.push(`of SKU ${[].concat(p.sku).join(", ")}`);
    if (p.day_of_week) bits.push(`on ${[].concat(p.day_of_week).join(", ")}`);
    if (p.within_days) bits.push(`in the last ${p.within_days} days`);
    return `${bits.join(" ")} ${op} ${value}`;
  }
  return JSON.stringify(node);
}

// -- views -------------------------------------------------------------------------------------

async function loginView() {
  const input = h("input", { type: "password", id: "key", placeholder: "ops API key (CRM_API_KEYS)", autocomplete: "off" });
  const msg = h("div");
  const form = h("form", {
    class: "panel login", id: "login",
    onsubmit: async (ev) => {
      ev.preventDefault();
      sessionStorage.setItem(KEY_STORE, input.value.trim());
      try { await api("offers", "/v1/campaigns?limit=1"); location.hash = "#/campaigns"; }
      catch (e) { sessionStorage.removeItem(KEY_STORE); msg.replaceChildren(errorBox(e)); }
    },
  }, h("h1", {}, "Sign in"), h("p", { class: "sub" }, "The console uses one of the ops keys of CRM_API_KEYS. A key without ",
    h("b", {}, "write"), " can only look; one without ", h("b", {}, "pii"), " sees e-mail addresses and phone numbers masked."),
  h("div", { class: "inline" }, input, " ", h("button", { type: "submit", id: "sign-in" }, "Sign in")), msg);
  return [form];
}

async function campaignsView() {
  const page = await api("offers", "/v1/campaigns?limit=200");
  const reports = await Promise.all(page.items.map((c) => api("offers", `/v1/campaigns/${encodeURIComponent(c.id)}/report`).catch(() => null)));
  const rows = page.items.map((c, i) => ({ ...c, __id: c.id, report: reports[i] }));
  const reach = (r) => (r.report ? r.report.arms.treated.members : null);
  return [h("h1", {}, "Campaigns"), h("div", { class: "sub" }, `${page.total} campaigns. Reach: members of the treated arm; uplift: incremental revenue against the control arm with its 95% interval.`),
    table([
      ["Campaign", (r) => h("a", { href: `#/campaigns/${encodeURIComponent(r.id)}`, "data-k": "name" }, r.name)],
      ["State", (r) => state(r.state)],
      ["Version", (r) => r.version, { num: true }],
      ["Reach", (r) => int(reach(r)), { num: true, k: "reach" }],
      ["Messages sent", (r) => int(r.messages_sent), { num: true, k: "messages" }],
      ["Uplift (incremental revenue)", (r) => (r.report ? fmt(r.report.incremental_revenue && r.report.incremental_revenue.estimate) : "—"), { num: true, k: "uplift" }],
      ["95% interval", (r) => (r.report && r.report.incremental_revenue ? `[${fmt(r.report.incremental_revenue.low)}, ${fmt(r.report.incremental_revenue.high)}]` : "—"), { num: true, k: "interval" }],
      ["ROI", (r) => (r.report && r.report.roi ? fmt(r.report.roi.estimate) : "—"), { num: true, k: "roi" }],
    ], rows, "campaigns")];
}

async function campaignView(id) {
  const path = `/v1/campaigns/${encodeURIComponent(id)}`;
  const [c, report, outcomes] = await Promise.all([api("offers", path), api("offers", `${path}/report`), api("offers", `${path}/outcomes`)]);
  const arms = report.arms;
  const series = report.series || [];
  const dry = h("div", { id: "dry-run-result" });
  const runDry = async () => {
    dry.replaceChildren(h("span", { class: "muted" }, "running…"));
    try {
      const d = await api("offers", `${path}/dry-run`, { method: "POST" });
      dry.replaceChildren(h("div", { class: "cards" }, card("Evaluated", int(d.evaluated), "dry-evaluated"), card("Would reach", int(d.reached), "dry-reached"),
        card("Expected cost", fmt(d.expected_cost), "dry-cost", `discounts ${fmt(d.discount_cost)}, channel ${fmt(d.channel_cost)}`),
        card("Expected redemption", pct(d.expected_redemption_rate), "dry-redemption")),
      table([["Outcome", (r) => r[0]], ["Customers", (r) => int(r[1]), { num: true, k: "count" }]], Object.entries(d.outcomes).map(([o, n]) => Object.assign([o, n], { __id: o })), "dry-outcomes"));
    } catch (e) { dry.replaceChildren(errorBox(e)); }
  };
  const whyOut = h("div", { id: "why-result" });
  const whyInput = h("input", { type: "text", id: "why-customer", placeholder: "customer id" });
  const why = async (ev) => {
    ev.preventDefault();
    try {
      const w = await api("offers", `${path}/why/${encodeURIComponent(whyInput.value.trim())}`);
      whyOut.replaceChildren(h("p", { "data-k": "why-sentence" }, w.sentence));
    } catch (e) { whyOut.replaceChildren(errorBox(e)); }
  };
  const warnings = (report.warnings || []).map((w) => h("div", { class: "muted", "data-k": "warning" }, "⚠ " + w));
  // Pause or resume (a change: the key needs the write scope; a read key is shown the API's 403).
  const move = { active: ["pause", "Pause"], paused: ["resume", "Resume"] }[c.state];
  const moveOut = h("span", { id: "state-result" });
  const changeState = async () => {
    try {
      await api("offers", `${path}/${move[0]}`, { method: "POST" });
      await render();
    } catch (e) { moveOut.replaceChildren(errorBox(e)); }
  };
  return [
    h("h1", {}, c.name, " ", state(c.state), " ", move ? h("button", { id: "state-change", onclick: changeState }, move[1]) : null, moveOut),
    h("div", { class: "sub" }, `version ${c.version} · attribution ${report.attribution_days} days · control share ${pct(report.control_share)}`),
    h("div", { class: "cards" },
      card("Treated", int(arms.treated.members), "treated-members", `converted ${int(arms.treated.converted)} (${pct(arms.treated.conversion_rate)})`),
      card("Control", int(arms.control.members), "control-members", `converted ${int(arms.control.converted)} (${pct(arms.control.conversion_rate)})`),
      card("Incremental revenue", fmt(report.incremental_revenue && report.incremental_revenue.estimate), "incremental", report.incremental_revenue ? h("span", { "data-k": "incremental-interval" }, `95% [${fmt(report.incremental_revenue.low)}, ${fmt(report.incremental_revenue.high)}]`) : "no interval"),
      card("Cost", fmt(report.cost.total), "cost", `discounts ${fmt(report.cost.discounts)}, channel ${fmt(report.cost.channel)}, points ${fmt(report.cost.points_value)}`),
      card("ROI", report.roi ? fmt(report.roi.estimate) : "—", "roi", report.roi ? `95% [${fmt(report.roi.low)}, ${fmt(report.roi.high)}]` : null)),
    warnings,
    h("div", { class: "grid2" },
      h("div", { class: "panel" }, h("h2", {}, "Conversion by day, treated vs control"),
        lineChart(series.map((d) => day(d.day).slice(5)), [
          { name: "treated", color: "var(--treated)", values: series.map((d) => d.conversion_rate.treated) },
          { name: "control", color: "var(--control)", values: series.map((d) => d.conversion_rate.control) },
        ], { yFormat: pct, k: "conversion-chart" }),
        h("details", {}, h("summary", {}, "the figures"), table([
          ["Day", (d) => day(d.day)], ["Treated", (d) => pct(d.conversion_rate.treated), { num: true, k: "treated" }],
          ["Control", (d) => pct(d.conversion_rate.control), { num: true, k: "control" }], ["Sent", (d) => int(d.sent), { num: true }]],
        series.map((d) => ({ ...d, __id: day(d.day) })), "series"))),
      h("div", { class: "panel" }, h("h2", {}, "Decision outcomes"),
        table([["Outcome", (r) => r[0]], ["Decisions", (r) => int(r[1]), { num: true, k: "count" }]],
          Object.entries(outcomes).sort((a, b) => b[1] - a[1]).map(([o, n]) => Object.assign([o, n], { __id: o })), "outcomes"))),
    h("div", { class: "panel" }, h("h2", {}, "Dry run"), h("p", { class: "muted" }, "Evaluates the campaign now over every profile without sending or storing anything (any key may run it)."),
      h("button", { id: "dry-run", onclick: runDry }, "Dry run now"), dry),
    h("div", { class: "panel" }, h("h2", {}, "Why did or didn't a customer get it"),
      h("form", { class: "inline", onsubmit: why }, whyInput, h("button", { type: "submit", id: "why-submit" }, "Explain")), whyOut),
  ];
}

async function segmentsView() {
  const segments = await api("segmentation", "/v1/segments");
  return [h("h1", {}, "Segments"), h("div", { class: "sub" }, `${segments.length} segments, with their current size and rule.`),
    table([
      ["Segment", (r) => h("a", { href: `#/segments/${encodeURIComponent(r.key)}`, "data-k": "name" }, r.name)],
      ["Key", (r) => r.key],
      ["Size", (r) => int(r.size), { num: true, k: "size" }],
      ["Rule", (r) => h("div", { class: "rule" }, ruleText(r.rule))],
    ], segments.map((x) => ({ ...x, __id: x.key })), "segments")];
}

async function segmentView(segKey) {
  const [seg, sizes] = await Promise.all([api("segmentation", `/v1/segments/${encodeURIComponent(segKey)}`), api("segmentation", `/v1/segments/${encodeURIComponent(segKey)}/sizes`)]);
  return [h("h1", {}, seg.name), h("div", { class: "sub" }, `${seg.key} · version ${seg.version}${seg.builtin ? " · built in" : ""}`),
    h("div", { class: "cards" }, card("Members now", int(seg.size), "size"), card("Size points", int(sizes.length), "points")),
    h("div", { class: "panel" }, h("h2", {}, "Rule"), h("div", { class: "rule", "data-k": "rule" }, ruleText(seg.rule))),
    h("div", { class: "panel" }, h("h2", {}, "Size over time"),
      sizes.length ? lineChart(sizes.map((p) => when(p.at).slice(5)), [{ name: "members", color: "var(--treated)", values: sizes.map((p) => p.size) }], { yFormat: int, k: "sizes-chart" }) : h("p", { class: "muted" }, "no size history yet (one point per sweep)"),
      table([["At", (p) => when(p.at)], ["Members", (p) => int(p.size), { num: true, k: "size" }]], sizes, "sizes"))];
}

async function reportsView() {
  const [pareto, rfm, points, channels] = await Promise.all([
    api("segmentation", "/v1/reports/pareto"), api("segmentation", "/v1/reports/rfm"),
    api("loyalty", "/v1/reports/points"), api("notifier", "/v1/reports/channels")]);
  const curve = [{ top_percent: 0, share: 0 }, ...pareto.shares];
  if (!pareto.shares.some((p) => p.top_percent === 100)) curve.push({ top_percent: 100, share: pareto.revenue > 0 ? 1 : 0 });
  const cell = {};
  for (const c of rfm.cells) cell[`${c.r}-${c.f}`] = c;
  const rs = [5, 4, 3, 2, 1], fs = [1, 2, 3, 4, 5];
  const rfmGrid = h("table", { class: "rfm", "data-k": "rfm-grid" },
    h("thead", {}, h("tr", {}, h("th", {}, "R \\ F"), fs.map((f) => h("th", {}, `F${f}`)))),
    h("tbody", {}, rs.map((r) => h("tr", {}, h("th", {}, `R${r}`), fs.map((f) => {
      const c = cell[`${r}-${f}`];
      const alpha = c ? Math.min(0.85, 0.1 + c.customers / Math.max(1, ...rfm.cells.map((x) => x.customers))) : 0;
      return h("td", { "data-cell": `${r}-${f}`, style: `background: rgba(47,111,222,${alpha.toFixed(2)})` }, c ? int(c.customers) : "");
    })))));
  const months = points.months || [];
  return [h("h1", {}, "Reports"),
    h("div", { class: "grid2" },
      h("div", { class: "panel" }, h("h2", {}, "Pareto: share of revenue by top customers"),
        h("div", { class: "sub" }, `${int(pareto.customers)} buying customers, revenue ${fmt(pareto.revenue)}`),
        lineChart(curve.map((p) => p.top_percent), [{ name: "share of revenue", color: "var(--treated)", values: curve.map((p) => p.share) }], { yFormat: pct, k: "pareto-chart", xNumeric: true }),
        table([["Top customers", (p) => `${p.top_percent}%`], ["Revenue", (p) => fmt(p.revenue), { num: true, k: "revenue" }], ["Share", (p) => pct(p.share), { num: true, k: "share" }]],
          pareto.shares.map((p) => ({ ...p, __id: p.top_percent })), "pareto")),
      h("div", { class: "panel" }, h("h2", {}, "RFM grid (customers)"), rfmGrid,
        h("h2", {}, "RFM groups"), table([["Group", (g) => g.group], ["Customers", (g) => int(g.customers), { num: true, k: "customers" }], ["Revenue", (g) => fmt(g.revenue), { num: true, k: "revenue" }]],
          rfm.groups.map((g) => ({ ...g, __id: g.group })), "rfm-groups"))),
    h("div", { class: "grid2" },
      h("div", { class: "panel" }, h("h2", {}, "Loyalty liability by month"),
        h("div", { class: "sub" }, `issued ${fmt(points.issued_total)} points, redeemed ${fmt(points.redeemed_total)}, redemption rate ${pct(points.redemption_rate)}`),
        barChart(months.map((m) => String(m.month).slice(0, 7)), months.map((m) => m.liability_money), { k: "liability-chart" }),
        table([["Month", (m) => String(m.month).slice(0, 7)], ["Issued", (m) => fmt(m.issued), { num: true, k: "issued" }], ["Redeemed", (m) => fmt(m.redeemed), { num: true, k: "redeemed" }],
          ["Expired", (m) => fmt(m.expired), { num: true, k: "expired" }], ["Liability (points)", (m) => fmt(m.liability_points), { num: true, k: "liability-points" }],
          ["Liability (money)", (m) => fmt(m.liability_money), { num: true, k: "liability-money" }]], months.map((m) => ({ ...m, __id: String(m.month).slice(0, 7) })), "liability")),
      h("div", { class: "panel" }, h("h2", {}, "Channel cost"),
        h("div", { class: "cards" }, card("Total", fmt(channels.total), "channel-total"), Object.entries(channels.by_channel).map(([ch, v]) => card(ch, fmt(v), `channel-${ch}`))),
        table([["Month", (r) => r.month], ["Channel", (r) => r.channel], ["Sent", (r) => int(r.sent), { num: true, k: "sent" }], ["Cost", (r) => fmt(r.cost), { num: true, k: "cost" }]],
          channels.rows.map((r) => ({ ...r, __id: `${r.month}/${r.channel}` })), "channels")))];
}

async function customersView(id) {
  const input = h("input", { type: "text", id: "customer-id", placeholder: "customer id", value: id || "" });
  const form = h("form", { class: "inline", onsubmit: (ev) => { ev.preventDefault(); location.hash = `#/customers/${encodeURIComponent(input.value.trim())}`; } },
    input, h("button", { type: "submit" }, "Open"));
  if (!id) return [h("h1", {}, "Customers"), h("div", { class: "sub" }, "Open a customer by id: profile, segments, ledger, offers, messages and every campaign decision."), form];
  const q = encodeURIComponent(id);
  const [profile, contact, account, ledger, coupons, decisions, messages] = await Promise.all([
    maybe("segmentation", `/v1/profiles/${q}`), maybe("notifier", `/v1/customers/${q}/contact`), maybe("loyalty", `/v1/accounts/${q}`),
    maybe("loyalty", `/v1/accounts/${q}/ledger`), api("offers", `/v1/customers/${q}/coupons`), api("offers", `/v1/customers/${q}/decisions`),
    api("notifier", `/v1/customers/${q}/messages`)]);
  const traits = profile ? profile.traits || {} : {};
  return [form, h("h1", {}, id, traits.first_name ? ` · ${traits.first_name} ${traits.last_name || ""}` : ""),
    h("div", { class: "cards" },
      card("E-mail", (contact && contact.email) || traits.email || "—", "email"),
      card("Phone", (contact && contact.phone) || traits.phone || "—", "phone"),
      card("Orders", profile ? int(profile.orders) : "—", "orders", profile ? `revenue ${fmt(profile.revenue)}` : null),
      card("Lifecycle", profile ? profile.lifecycle : "—", "lifecycle", profile ? `RFM ${profile.rfm_group || "—"}, tier ${profile.value_tier || "—"}` : null),
      card("Points", account ? fmt(account.balance) : "—", "balance", account ? `tier ${account.tier}, worth ${fmt(account.balance_value)}` : "no loyalty account")),
    h("div", { class: "grid2" },
      h("div", { class: "panel" }, h("h2", {}, "Profile"), profile ? table([["Field", (r) => r[0]], ["Value", (r) => r[1], { k: "value" }]], [
        ["first purchase", day(profile.first_purchase_at)], ["last purchase", day(profile.last_purchase_at)], ["average check", fmt(profile.avg_check)],
        ["favourite category", profile.favourite_category || "—"], ["cadence (days)", fmt(profile.cadence_days, 1)], ["acquisition", profile.acquisition_channel || "—"],
        ["consents", Object.entries(profile.consents || {}).map(([k2, v]) => `${k2}: ${v && typeof v === "object" ? v.granted : v}`).join(", ") || "—"],
      ].map((r) => Object.assign(r, { __id: r[0] })), "profile") : h("p", { class: "muted" }, "no profile"),
      h("h2", {}, "Segments"), table([["Segment", (x) => x.name], ["Entered", (x) => when(x.entered_at)]], profile ? profile.segments.map((x) => ({ ...x, __id: x.key })) : [], "customer-segments")),
      h("div", { class: "panel" }, h("h2", {}, "Ledger"), table([["When", (e) => when(e.occurred_at)], ["Kind", (e) => e.kind], ["Points", (e) => fmt(e.points), { num: true, k: "points" }], ["Balance", (e) => fmt(e.balance_after), { num: true, k: "balance" }]],
        ledger ? ledger.entries.map((e) => ({ ...e, __id: e.seq })) : [], "ledger"))),
    h("div", { class: "panel" }, h("h2", {}, "Decisions: why they did or didn't get each campaign"),
      table([["When", (d) => when(d.at)], ["Campaign", (d) => h("a", { href: `#/campaigns/${encodeURIComponent(d.campaign_id)}` }, d.campaign_id)], ["Outcome", (d) => d.outcome, { k: "outcome" }], ["Why", (d) => d.explanation, { k: "why" }], ["Delivery", (d) => d.delivery_status || "—"]],
        decisions.map((d, i) => ({ ...d, __id: i })), "decisions")),
    h("div", { class: "grid2" },
      h("div", { class: "panel" }, h("h2", {}, "Offers (coupons)"), table([["Code", (c) => c.code, { k: "code" }], ["Campaign", (c) => c.campaign_id], ["State", (c) => state(c.state)], ["Value", (c) => fmt(c.value)], ["Uses", (c) => `${c.uses}/${c.max_uses}`]],
        coupons.map((c) => ({ ...c, __id: c.code })), "coupons")),
      h("div", { class: "panel" }, h("h2", {}, "Messages"), table([["Created", (m) => when(m.created_at)], ["Template", (m) => m.template], ["Channel", (m) => m.channel || "—", { k: "channel" }], ["State", (m) => state(m.state)], ["Reason", (m) => m.reason || ""]],
        messages.items.map((m) => ({ ...m, __id: m.id })), "messages")))];
}

const SERVICES = ["ingest", "segmentation", "loyalty", "offers", "notifier"];
async function operationsView() {
  const [pipelines, dlqs, providers] = await Promise.all([
    Promise.all(SERVICES.map((x) => api(x, "/v1/ops/pipeline").catch((e) => ({ error: e })))),
    Promise.all(SERVICES.map((x) => api(x, "/v1/ops/dlq").catch((e) => ({ error: e, items: [] })))),
    api("notifier", "/v1/providers")]);
  const consumers = SERVICES.flatMap((svc, i) => (pipelines[i].consumers || []).map((c) => ({ ...c, service: svc, __id: `${svc}/${c.name}` })));
  const dead = SERVICES.flatMap((svc, i) => dlqs[i].items.map((e) => ({ ...e, service: svc, __id: e.id })));
  return [h("h1", {}, "Operations"),
    h("div", { class: "cards" }, SERVICES.map((svc, i) => card(`${svc} outbox`, pipelines[i].error ? "?" : int(pipelines[i].outbox_backlog), `outbox-${svc}`,
      pipelines[i].error ? pipelines[i].error.message : `lag ${int((pipelines[i].consumers || []).reduce((a, c) => a + (c.lag || 0), 0))}`))),
    h("div", { class: "panel" }, h("h2", {}, "Consumers"), table([["Service", (c) => c.service], ["Consumer", (c) => c.name], ["Lag", (c) => (c.lag === null ? "?" : int(c.lag)), { num: true, k: "lag" }],
      ["Applied", (c) => int(c.applied), { num: true }], ["Dead-lettered", (c) => int(c.dead_lettered), { num: true, k: "dead" }], ["Group", (c) => (c.group ? c.group.state : "?")], ["Last batch", (c) => when(c.last_batch_at)]], consumers, "consumers")),
    h("div", { class: "panel" }, h("h2", {}, "Provider breakers"), table([["Provider", (p) => p.name], ["Channel", (p) => p.channel], ["Breaker", (p) => state(p.breaker), { k: "breaker" }],
      ["Failures in a row", (p) => int(p.consecutive_failures), { num: true }], ["Sent", (p) => int(p.sent), { num: true }], ["Waiting", (p) => int(Object.values(p.waiting || {}).reduce((a, b) => a + b, 0)), { num: true }], ["Last error", (p) => p.last_error || ""]],
    providers.map((p) => ({ ...p, __id: p.name })), "providers")),
    h("div", { class: "panel" }, h("h2", {}, "Dead-letter queue"), table([["Failed at", (e) => when(e.failed_at)], ["Service", (e) => e.service], ["Consumer", (e) => e.consumer], ["Source", (e) => `${e.source_topic}[${e.partition}]@${e.offset}`], ["Message", (e) => e.message_id || "—"], ["Reason", (e) => e.error, { k: "reason" }]],
      dead, "dlq"))];
}

// -- routing -----------------------------------------------------------------------------------

const ROUTES = [
  [/^#\/login$/, loginView, null],
  [/^#\/campaigns\/(.+)$/, campaignView, "campaigns"],
  [/^#\/campaigns$/, campaignsView, "campaigns"],
  [/^#\/segments\/(.+)$/, segmentView, "segments"],
  [/^#\/segments$/, segmentsView, "segments"],
  [/^#\/reports$/, reportsView, "reports"],
  [/^#\/customers(?:\/(.*))?$/, customersView, "customers"],
  [/^#\/operations$/, operationsView, "operations"],
];

let rendering = 0;
async function render() {
  const hash = location.hash || "#/campaigns";
  if (!key() && hash !== "#/login") { location.hash = "#/login"; return; }
  const [re, fn, nav] = ROUTES.find(([r]) => r.test(hash)) || ROUTES[2];
  const arg = (hash.match(re) || [])[1];
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.nav === nav);
  document.getElementById("who").replaceChildren(key() ? h("span", {}, "signed in", h("button", { class: "secondary", id: "sign-out", onclick: () => { sessionStorage.removeItem(KEY_STORE); location.hash = "#/login"; } }, "Sign out")) : "");
  const mine = ++rendering;
  document.body.dataset.loaded = "";
  view.replaceChildren(h("p", { class: "muted" }, "loading…"));
  let nodes;
  try { nodes = await fn(arg === undefined ? undefined : decodeURIComponent(arg)); } catch (e) { nodes = [errorBox(e)]; }
  if (mine !== rendering) return;
  view.replaceChildren(...nodes.flat(Infinity));
  document.body.dataset.loaded = hash; // the browser tests wait for this
}

window.addEventListener("hashchange", render);
render();
