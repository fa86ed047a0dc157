// The live sale dashboard: polls the syncer's figures and draws them. No library, nothing
// loaded from elsewhere (the syncer's Content-Security-Policy allows only this origin).
"use strict";

(() => {
  const POLL_MS = 1000;
  // After a failed poll the wait doubles up to this, so a syncer that is down is not hammered.
  const BACKOFF_MAX_MS = 30000;
  // A poll that hangs is given up after this.
  const POLL_TIMEOUT_MS = 10000;
  const ANSWERS = ["won", "sold_out", "duplicate", "limit", "rate_limited", "other", "error"];
  const ANSWER_COLORS = {
    won: "#1e7b34", sold_out: "#b3261e", duplicate: "#8e5bc2", limit: "#c77c02",
    rate_limited: "#2a6fdb", other: "#7a8591", error: "#000000",
  };
  const STOCK_SERIES = [
    { label: "stock left", color: "#2a6fdb", value: (s) => s.redis && s.redis.available },
    { label: "reserved", color: "#c77c02", value: (s) => s.redis && s.redis.reserved },
    { label: "sold", color: "#1e7b34", value: (s) => s.redis && s.redis.sold },
    { label: "reserved+sold in MySQL", color: "#7a8591", dashed: true,
      value: (s) => s.mysql && s.mysql.reserved + s.mysql.sold },
  ];
  const SVG = "http://www.w3.org/2000/svg";

  // goods id -> { card, samples }; samples are bounded by the syncer's history_max.
  const shown = new Map();
  let since = null;
  let historyMax = 300;
  let failures = 0;

  function field(card, name) {
    return card.querySelector(`[data-field="${name}"]`);
  }

  function put(card, name, text) {
    const element = field(card, name);
    if (element) element.textContent = text;
    return element;
  }

  const count = (n) => (n === null || n === undefined ? "–" : String(n));
  const rate = (n) => (n >= 100 ? n.toFixed(0) : n.toFixed(1));

  function age(ms) {
    if (ms === null || ms === undefined) return "–";
    if (ms < 1000) return `${ms} ms`;
    if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
    if (ms < 3600000) return `${Math.round(ms / 60000)} min`;
    return `${(ms / 3600000).toFixed(1)} h`;
  }

  const clock = (ms) => new Date(ms).toLocaleTimeString();

  function setState(state, text) {
    document.body.dataset.state = state;
    document.getElementById("status").textContent = text;
  }

  function cardFor(goods) {
    let entry = shown.get(goods.goods_id);
    if (!entry) {
      const template = document.getElementById("sale");
      const card = template.content.firstElementChild.cloneNode(true);
      card.dataset.goods = goods.goods_id;
      entry = { card, samples: [] };
      shown.set(goods.goods_id, entry);
    }
    return entry;
  }

  function phase(goods, now) {
    if (goods.mode !== "redis" && goods.tier !== "db") return [`decided by MySQL (${goods.mode})`, "alert"];
    if (now < goods.starts_at_ms) return [`opens in ${age(goods.starts_at_ms - now)}`, ""];
    if (now >= goods.ends_at_ms) return ["ended", ""];
    if (goods.redis && goods.redis.available === 0) return ["sold out", "live"];
    return ["live", "live"];
  }

  function renderGoods(goods, data) {
    const entry = cardFor(goods);
    const card = entry.card;
    const last = entry.samples.length ? entry.samples[entry.samples.length - 1].at_ms : -Infinity;
    for (const sample of goods.history) {
      if (sample.at_ms > last) entry.samples.push(sample);
    }
    if (entry.samples.length > historyMax) entry.samples.splice(0, entry.samples.length - historyMax);

    put(card, "goods_id", goods.goods_id);
    const [phaseText, phaseClass] = phase(goods, data.now_ms);
    const badge = put(card, "phase", phaseText);
    badge.className = phaseClass;
    const shards = goods.shards > 1 ? `, ${goods.shards} shards` : "";
    put(card, "meta", `tier ${goods.tier}${shards} · ${clock(goods.starts_at_ms)} to ${clock(goods.ends_at_ms)}`);

    // The headline is the store that decides: Redis, or MySQL for a db goods.
    const decider = goods.redis || goods.mysql;
    for (const key of ["available", "reserved", "sold", "total"]) {
      put(card, `stock.${key}`, count(decider && decider[key]));
    }
    put(card, "stock.source", goods.redis ? "as Redis decides them" : goods.mysql ? "as MySQL holds them (Redis has no sale)" : "no store could be read");
    for (const store of ["redis", "mysql"]) {
      for (const key of ["available", "reserved", "sold", "lapsed"]) {
        put(card, `${store}.${key}`, count(goods[store] && goods[store][key]));
      }
    }
    for (const answer of ANSWERS) {
      put(card, `per_s.${answer}`, rate(goods.answers_per_s[answer]));
      put(card, `total.${answer}`, count(goods.answers[answer]));
    }
    put(card, "outbox", goods.outbox === null ? "–" : `${goods.outbox} events`);
    put(card, "outbox_age", goods.outbox ? age(goods.outbox_oldest_age_ms) : "–");
    put(card, "mysql_written", goods.mysql_written_age_ms === null ? "–" : `${age(goods.mysql_written_age_ms)} ago`);
    renderDrift(card, goods.drift, data.sync);

    drawChart(card.querySelector('[data-chart="stock"]'), entry.samples, STOCK_SERIES, count);
    drawChart(card.querySelector('[data-chart="answers"]'), entry.samples, answerSeries(entry.samples), rate);
    return card;
  }

  function renderDrift(card, drift, sync) {
    const element = field(card, "drift");
    element.className = "";
    if (!drift) {
      element.textContent = "–";
      element.title = "not reconciled yet (or a db goods: MySQL alone holds it)";
      return;
    }
    const parts = `available ${drift.available}, reserved ${drift.reserved}, sold ${drift.sold}, lapsed ${drift.lapsed}`;
    element.title = parts;
    if (drift.missing_from_redis) {
      element.textContent = "Redis forgot the sale";
      element.className = "bad";
    } else if (!drift.conserved) {
      element.textContent = "not conserved";
      element.className = "bad";
    } else if (drift.total === 0) {
      element.textContent = "0";
      element.className = "good";
    } else if (sync && sync.settled) {
      element.textContent = `${drift.total} (settled: real)`;
      element.className = "bad";
    } else {
      element.textContent = `${drift.total} (events in flight)`;
    }
  }

  // Answers per second between successive samples, from the running totals.
  function answerSeries(samples) {
    return ANSWERS.map((answer) => ({
      label: answer.replace("_", " "),
      color: ANSWER_COLORS[answer],
      value: (s, i) => {
        if (i === 0) return null;
        const previous = samples[i - 1];
        const seconds = (s.at_ms - previous.at_ms) / 1000;
        if (seconds <= 0) return null;
        return Math.max(0, s.answers[answer] - previous.answers[answer]) / seconds;
      },
    }));
  }

  function svgElement(name, attributes, text) {
    const element = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
    if (text !== undefined) element.textContent = text;
    return element;
  }

  // A line chart of `series` over the samples' time span, drawn from scratch each time;
  // `format` writes the top of the scale.
  function drawChart(svg, samples, series, format) {
    const width = 600, height = 170, left = 44, right = 8, top = 8, bottom = 40;
    svg.replaceChildren();
    const points = series.map((s) => samples.map((sample, i) => [sample.at_ms, s.value(sample, i)]));
    const values = points.flat().map((p) => p[1]).filter((v) => typeof v === "number");
    if (samples.length < 2 || values.length === 0) {
      svg.append(svgElement("text", { x: left, y: height / 2 }, "collecting samples…"));
      return;
    }
    const t0 = samples[0].at_ms, t1 = samples[samples.length - 1].at_ms;
    const max = Math.max(1, ...values);
    const x = (t) => left + ((t - t0) / Math.max(1, t1 - t0)) * (width - left - right);
    const y = (v) => top + (1 - v / max) * (height - top - bottom);
    svg.append(svgElement("line", { class: "axis", x1: left, y1: y(0), x2: width - right, y2: y(0) }));
    svg.append(svgElement("line", { class: "axis", x1: left, y1: top, x2: left, y2: y(0) }));
    svg.append(svgElement("text", { x: left - 4, y: top + 8, "text-anchor": "end" }, format(max)));
    svg.append(svgElement("text", { x: left - 4, y: y(0), "text-anchor": "end" }, "0"));
    svg.append(svgElement("text", { x: left, y: y(0) + 13 }, `${age(t1 - t0)} ago`));
    svg.append(svgElement("text", { x: width - right, y: y(0) + 13, "text-anchor": "end" }, "now"));
    let legendX = left;
    series.forEach((s, k) => {
      const path = points[k]
        .filter((p) => typeof p[1] === "number")
        .map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`)
        .join(" ");
      if (path) {
        const line = { points: path, fill: "none", stroke: s.color, "stroke-width": 1.6 };
        if (s.dashed) line["stroke-dasharray"] = "4 3";
        svg.append(svgElement("polyline", line));
      }
      svg.append(svgElement("rect", { x: legendX, y: height - 11, width: 10, height: 3, fill: s.color }));
      const label = svgElement("text", { x: legendX + 14, y: height - 6 }, s.label);
      svg.append(label);
      legendX += 22 + s.label.length * 6;
    });
  }

  function renderHeader(data) {
    const sync = data.sync;
    put(document, "sync.kafka_lag", sync ? count(sync.kafka_lag) : "–");
    put(document, "sync.dead_letters", sync ? count(sync.dead_letters) : "–");
    let reconciled = "not yet";
    if (sync) {
      reconciled = `${age(data.now_ms - sync.reconciled_at_ms)} ago${sync.settled ? ", settled" : ""}`;
      if (sync.failed_at_ms) reconciled += ` (failed ${age(data.now_ms - sync.failed_at_ms)} ago)`;
    }
    put(document, "sync.reconciled", reconciled);
    const unlisted = ANSWERS.reduce((sum, answer) => sum + data.unlisted[answer], 0);
    put(document, "unlisted", `${unlisted} answers`);
    const failing = [];
    if (data.mysql.failing_since_ms) failing.push(`MySQL unreadable for ${age(data.now_ms - data.mysql.failing_since_ms)}`);
    if (data.redis.failing_since_ms) failing.push(`Redis unreadable for ${age(data.now_ms - data.redis.failing_since_ms)}`);
    if (failing.length) {
      setState("degraded", `${failing.join("; ")} · updated ${clock(data.now_ms)}`);
    } else {
      const sales = data.goods.length === 1 ? "1 sale" : `${data.goods.length} sales`;
      setState("live", `${sales} · updated ${clock(data.now_ms)} · refreshed every ${data.sample_every_ms / 1000} s`);
    }
  }

  function render(data) {
    historyMax = data.history_max;
    const main = document.getElementById("sales");
    const listed = new Set();
    for (const goods of data.goods) {
      listed.add(goods.goods_id);
      main.append(renderGoods(goods, data));
      for (const sample of goods.history) since = Math.max(since ?? sample.at_ms, sample.at_ms);
    }
    for (const [id, entry] of shown) {
      if (!listed.has(id)) {
        entry.card.remove();
        shown.delete(id);
      }
    }
    field(document, "empty").hidden = data.goods.length > 0;
    renderHeader(data);
    document.body.dataset.updatedMs = String(data.now_ms);
  }

  async function poll() {
    let delay = POLL_MS;
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), POLL_TIMEOUT_MS);
    try {
      const query = since === null ? "" : `?since=${since}`;
      const response = await fetch(`dashboard/data${query}`, { cache: "no-store", signal: controller.signal });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      render(await response.json());
      failures = 0;
    } catch (error) {
      failures += 1;
      delay = Math.min(BACKOFF_MAX_MS, POLL_MS * 2 ** failures);
      setState("offline", `No figures from the syncer (${error.message}); trying again in ${Math.round(delay / 1000)} s`);
    } finally {
      clearTimeout(timer);
    }
    setTimeout(poll, delay);
  }

  poll();
})();
