// levee dashboard: vanilla JS, no libraries, no network beyond levee's admin API.
// Every string from the server is put into the DOM with textContent (client keys
// are attacker-controlled); nothing here ever parses data as markup.
//
// With admin.token set, the API answers 401 until the page sends the token: the
// page then shows a small form, keeps the token in sessionStorage (this tab's
// session only) and sends it as `Authorization: Bearer` on every call. The event
// stream is read with a streaming fetch rather than EventSource, because
// EventSource cannot send headers and a token in a URL ends up in logs.
(function () {
  "use strict";

  var WINDOW_S = 300;          // chart history
  var STALE_DATA_S = 5;        // no data for this long: "disconnected"
  var POLL_MS = 2000;          // fallback polling period
  var FEED_MAX = 20;
  var STREAM_AFTER_MS = 6000;  // see "start" below
  var RECONNECT_MS = 3000;     // a dropped event stream is reopened after this
  var EVENT_MAX = 4 << 20;     // an event larger than this ends the stream
  var SVG_NS = "http://www.w3.org/2000/svg";
  // The admin API relative to this page ("/dashboard" or "/dashboard/", also
  // behind a reverse proxy that adds a path prefix).
  var BASE = location.pathname.replace(/dashboard\/?$/, "");
  var W = 600, H = 120;        // chart viewBox

  var REASON_COLOURS = {
    rate_limited: "#ffb020", callback_bomb: "#ff5c8a", retry_storm: "#c77dff",
    circuit_open: "#ff6b3d", overloaded: "#4cc9f0", retry_budget: "#9ad36a",
    upstream_auth_anomaly: "#f7f06d", store_unavailable: "#b8c0cc"
  };
  var EXTRA_COLOURS = ["#ff9e9e", "#80ffdb", "#ffd6a5", "#a0c4ff", "#e9c46a", "#f4a261"];
  var OUTCOME_COLOURS = { forwarded: "#3f8f6b", shed: "#ffb020", error: "#9aa7ff" };

  var history = {};            // route name -> [{t, fwd, err, shed, reasons:{r: rate}}]
  var prev = null;             // previous snapshot (for differencing)
  var last = null;             // last state rendered
  var lastDataAt = 0;          // Date.now() of last data
  var feed = [];
  var fetching = false;
  var streaming = false;       // the event stream is open and delivering
  var streamOpen = false;      // a stream request is in flight or open
  var streamWanted = false;    // the start delay has passed
  var locked = false;          // the API answered 401: a token is needed
  var alarmShape = null;       // alarm texts without numbers: re-announce only on change

  // ---------- small DOM helpers (text only) ----------
  function el(tag, attrs, children) {
    var n = document.createElement(tag);
    if (attrs) for (var k in attrs) {
      if (!Object.prototype.hasOwnProperty.call(attrs, k) || attrs[k] == null) continue;
      if (k === "text") n.textContent = String(attrs[k]);
      else if (k === "class") n.className = attrs[k];
      else n.setAttribute(k, String(attrs[k]));
    }
    (children || []).forEach(function (c) {
      if (c == null) return;
      n.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
    });
    return n;
  }
  function svg(tag, attrs) {
    var n = document.createElementNS(SVG_NS, tag);
    for (var k in attrs) n.setAttribute(k, String(attrs[k]));
    return n;
  }
  function $(id) { return document.getElementById(id); }
  function replace(node, children) {
    while (node.firstChild) node.removeChild(node.firstChild);
    children.forEach(function (c) { if (c) node.appendChild(c); });
  }
  function setText(id, t) { var n = $(id); if (n) n.textContent = t; }

  // ---------- formatting ----------
  function fmtRate(x) {
    if (x == null || !isFinite(x)) return "–";
    if (x === 0) return "0";
    if (x < 0.1) return x.toFixed(2);
    if (x < 10) return x.toFixed(1);
    if (x < 10000) return Math.round(x).toString();
    return (x / 1000).toFixed(1) + "k";
  }
  function fmtInt(x) { return x == null ? "–" : Number(x).toLocaleString("en"); }
  function fmtDur(s) {
    if (s == null || !isFinite(s)) return "?";
    s = Math.max(0, Math.round(s));
    if (s < 60) return s + " s";
    var m = Math.floor(s / 60);
    if (m < 60) return m + " min" + (s % 60 ? " " + (s % 60) + " s" : "");
    var h = Math.floor(m / 60);
    if (h < 48) return h + " h" + (m % 60 ? " " + (m % 60) + " min" : "");
    return Math.floor(h / 24) + " d" + (h % 24 ? " " + (h % 24) + " h" : "");
  }
  function fmtTime(unix) {
    if (unix == null) return "–";
    var d = new Date(unix * 1000);
    function p(n) { return (n < 10 ? "0" : "") + n; }
    return p(d.getHours()) + ":" + p(d.getMinutes()) + ":" + p(d.getSeconds());
  }
  function fmtDate(unix) {
    if (unix == null) return "–";
    return new Date(unix * 1000).toISOString().slice(0, 10);
  }
  function colourOf(reason) {
    if (REASON_COLOURS[reason]) return REASON_COLOURS[reason];
    var h = 0;
    for (var i = 0; i < reason.length; i++) h = (h * 31 + reason.charCodeAt(i)) >>> 0;
    return EXTRA_COLOURS[h % EXTRA_COLOURS.length];
  }
  function badge(kind, icon, word, title) {
    return el("span", { "class": "badge badge-" + kind, title: title }, [el("span", { "aria-hidden": "true", text: icon }), word]);
  }
  // Client keys can be 64 KiB: show the start, keep the whole key in a tooltip.
  function short(v, max) {
    var t = v == null ? "" : String(v);
    max = max || 48;
    return t.length > max ? t.slice(0, max - 1) + "…" : t;
  }
  function clientCell(v) {
    return el("td", { "class": "client", title: String(v == null ? "" : v).slice(0, 2000), text: short(v) });
  }
  function num(o) { return typeof o === "number" && isFinite(o) ? o : 0; }

  // ---------- data intake ----------
  function ingest(state) {
    if (!state || typeof state !== "object") return;
    lastDataAt = Date.now();
    var now = num(state.now) || Date.now() / 1000;
    if (last && num(last.now) > now) return;        // out of order (poll vs stream)
    var routes = state.routes || [];
    if (prev && now - num(prev.now) >= 0.5) {
      var dt = now - num(prev.now);
      var before = {};
      (prev.routes || []).forEach(function (r) { before[r.name] = r; });
      routes.forEach(function (r) {
        var p = before[r.name];
        if (!p) return;
        var rq = r.requests || {}, pq = p.requests || {};
        function d(a, b) { var x = num(a) - num(b); return x < 0 ? 0 : x / dt; } // counter reset: 0
        var sample = { t: now, fwd: d(rq.forwarded, pq.forwarded), err: d(rq.error, pq.error), shed: d(rq.shed, pq.shed), would: d(rq.shadow, pq.shadow), reasons: {} };
        var sr = r.shed_by_reason || {}, psr = p.shed_by_reason || {};
        Object.keys(sr).forEach(function (k) { sample.reasons[k] = d(sr[k], psr[k]); });
        var h = history[r.name] || (history[r.name] = []);
        h.push(sample);
        while (h.length && h[0].t < now - WINDOW_S) h.shift();
      });
      prev = state;
    } else if (!prev) {
      prev = state;
    }
    var names = {};
    routes.forEach(function (r) { names[r.name] = true; });
    Object.keys(history).forEach(function (k) { if (!names[k]) delete history[k]; });
    last = state;
    render(state);
  }

  function ingestShed(ev) {
    if (!ev || typeof ev !== "object") return;
    feed.unshift(ev);
    if (feed.length > FEED_MAX) feed.length = FEED_MAX;
    renderFeed();
  }

  // ---------- rendering ----------
  function render(s) {
    var now = num(s.now);
    setText("version", s.version || "–");
    var cfg = s.config || {};
    setText("config-hash", cfg.hash || "–");
    var lr = cfg.last_reload;
    var reloadDd = $("config-reload");
    if (!lr) { reloadDd.textContent = "none"; reloadDd.className = ""; }
    else if (lr.result === "applied") { reloadDd.textContent = "✓ applied " + fmtTime(lr.at); reloadDd.className = "state-ok"; }
    else { reloadDd.textContent = "✖ REJECTED " + fmtTime(lr.at); reloadDd.className = "state-bad"; }
    var st = s.store || {};
    var storeDd = $("store-summary");
    storeDd.textContent = (st.kind || "?") + (st.up === false ? " ✖ DOWN" : " ✓ up");
    storeDd.className = st.up === false ? "state-bad" : "state-ok";

    renderAlarms(s, now);
    renderTotals(s);
    renderRoutes(s, now);
    renderUpstreams(s);
    renderPlatform(s, now);
    setText("updated", fmtTime(now) + " (server time)");
    tick();
  }

  function alarm(kind, icon, headline, detail) {
    return el("div", { "class": "alarm alarm-" + kind, role: "alert" }, [
      el("span", { "class": "alarm-icon", "aria-hidden": "true", text: icon }),
      el("div", null, [el("span", { "class": "alarm-headline", text: headline }), detail ? el("span", { "class": "alarm-detail", text: detail }) : null])
    ]);
  }

  function silentFor(r, now) {
    return r.last_success == null ? null : now - r.last_success;
  }

  function renderAlarms(s, now) {
    var list = [];
    var staleNames = [];
    (s.routes || []).forEach(function (r) {
      if (!r.stale) return;
      staleNames.push(r.name);
      var silent = silentFor(r, now);
      var head = "STALE ROUTE " + r.name + ": " +
        (silent != null ? "silent for " + fmtDur(silent)
          : "no successful request since levee started" + (s.uptime_s != null ? " " + fmtDur(s.uptime_s) + " ago" : ""));
      var det = "Expected traffic within " + (r.expect_traffic_within_s != null ? fmtDur(r.expect_traffic_within_s) : "?") +
        (r.last_success != null ? "; last success at " + fmtTime(r.last_success) : "") +
        ". Clients may be failing before they reach levee (redirects, TLS, DNS).";
      list.push(alarm("stale", "⚠", head, det));
    });
    (s.routes || []).forEach(function (r) {
      var storm = r.storm || {};
      if (storm.alarm) {
        var q = storm.quarantined || {};
        var parts = Object.keys(q).map(function (k) { return k + " " + q[k]; });
        list.push(alarm("warning", "↯", "STORM ALARM on route " + r.name, "Quarantined clients: " + (parts.join(", ") || "none")));
      }
      if (r.auth_guard && r.auth_guard.tripped) {
        list.push(alarm("critical", "⊘", "AUTH GUARD TRIPPED on route " + r.name, "Upstream 401 wave answered as 503 upstream_auth_anomaly."));
      }
    });
    (s.upstreams || []).forEach(function (u) {
      if (u.circuit === "open") list.push(alarm("critical", "✖", "CIRCUIT OPEN: upstream " + u.name, "Requests are shed with 503 circuit_open."));
    });
    if (s.store && s.store.up === false) list.push(alarm("critical", "✖", "STORE DOWN: " + (s.store.kind || "store"), "Limits follow store.on_failure."));
    var lr = s.config && s.config.last_reload;
    if (lr && lr.result === "rejected") list.push(alarm("warning", "✖", "CONFIG RELOAD REJECTED at " + fmtTime(lr.at) + "; the previous config keeps running", lr.error || ""));
    (s.certificates || []).forEach(function (c) {
      if (c.days_left != null && c.days_left < 14) {
        list.push(alarm(c.days_left <= 0 ? "critical" : "warning", "◷",
          (c.days_left <= 0 ? "CERTIFICATE EXPIRED: " : "CERTIFICATE EXPIRES in " + fmtDur(c.days_left * 86400) + ": ") + (c.subject || "?"),
          "Chain position " + c.position + ", not after " + fmtDate(c.not_after)));
      }
    });
    // Keep the live region quiet when nothing changed: compare text first.
    var key = list.map(function (n) { return n.textContent; }).join("|");
    var box = $("alarm-list");
    var shape = key.replace(/[0-9]+ (s|min|h|d)\b/g, "");
    if (alarmShape !== shape || list.length !== box.childNodes.length) {
      replace(box, list);
      alarmShape = shape;
    } else {
      // Only durations moved: update text in place without re-announcing structure.
      for (var i = 0; i < list.length; i++) {
        var a = box.childNodes[i].querySelector(".alarm-headline"), b = list[i].querySelector(".alarm-headline");
        if (a && b && a.textContent !== b.textContent) a.textContent = b.textContent;
      }
    }
    document.title = (staleNames.length ? "⚠ STALE: " + staleNames.join(", ") + " · " : (list.length ? "⚠ " : "")) + "levee dashboard";
  }

  function latest(name) {
    var h = history[name];
    return h && h.length ? h[h.length - 1] : null;
  }

  function renderTotals(s) {
    var req = 0, shed = 0, err = 0, have = false;
    (s.routes || []).forEach(function (r) {
      var l = latest(r.name);
      if (!l) return;
      have = true;
      req += l.fwd + l.shed + l.err; shed += l.shed; err += l.err;
    });
    setText("t-req", have ? fmtRate(req) : "–");
    setText("t-shed", have ? fmtRate(shed) : "–");
    setText("t-err", have ? fmtRate(err) : "–");
    setText("t-share", have ? (req > 0 ? (100 * shed / req).toFixed(1) + " %" : "0 %") : "–");
    setText("t-clients", fmtInt((s.store || {}).tracked_clients));
  }

  function chart(samples, series, label) {
    // series: [{key, colour, get(sample)}], stacked bottom-up as areas.
    var wrap = el("div", { "class": "chart" });
    var box = svg("svg", { viewBox: "0 0 " + W + " " + H, preserveAspectRatio: "none", role: "img", "aria-label": label });
    var now = samples.length ? samples[samples.length - 1].t : 0;
    var max = 0;
    samples.forEach(function (sm) {
      var tot = 0; series.forEach(function (se) { tot += se.get(sm); }); if (tot > max) max = tot;
    });
    var top = max > 0 ? niceCeil(max) : 1;
    for (var g = 1; g < 4; g++) box.appendChild(svg("line", { x1: 0, x2: W, y1: H * g / 4, y2: H * g / 4, stroke: "#2e3746", "stroke-width": 1, "vector-effect": "non-scaling-stroke" }));
    if (samples.length >= 1) {
      var base = samples.map(function () { return 0; });
      function x(t) { return W - (now - t) / WINDOW_S * W; }
      function y(v) { return H - v / top * H; }
      series.forEach(function (se) {
        var upper = samples.map(function (sm, i) { return base[i] + se.get(sm); });
        if (upper.every(function (v, i) { return v === base[i]; })) return;
        var d = "";
        var pts = samples.length === 1 ? [samples[0], samples[0]] : samples;
        var xs = samples.length === 1 ? [x(samples[0].t) - 4, x(samples[0].t)] : samples.map(function (sm) { return x(sm.t); });
        var up = samples.length === 1 ? [upper[0], upper[0]] : upper;
        var lo = samples.length === 1 ? [base[0], base[0]] : base;
        for (var i = 0; i < pts.length; i++) d += (i ? "L" : "M") + xs[i].toFixed(1) + " " + y(up[i]).toFixed(1);
        for (var j = pts.length - 1; j >= 0; j--) d += "L" + xs[j].toFixed(1) + " " + y(lo[j]).toFixed(1);
        box.appendChild(svg("path", { d: d + "Z", fill: se.colour, "fill-opacity": 0.9 }));
        base = upper;
      });
    }
    wrap.appendChild(box);
    if (samples.length < 1) wrap.appendChild(el("span", { "class": "nodata", text: "collecting samples…" }));
    wrap.appendChild(el("span", { "class": "ymax", text: fmtRate(top) + "/s" }));
    wrap.appendChild(el("div", { "class": "xaxis", "aria-hidden": "true" }, [el("span", { text: "−5 min" }), el("span", { text: "−2½ min" }), el("span", { text: "now" })]));
    return wrap;
  }
  function niceCeil(v) {
    var p = Math.pow(10, Math.floor(Math.log10(v)));
    var m = v / p;
    return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * p;
  }
  function legend(items) {
    return el("ul", { "class": "legend" }, items.map(function (it) {
      return el("li", null, [el("span", { "class": "swatch", style: "background:" + it.colour, "aria-hidden": "true" }),
        el("span", { "class": "legend-name", text: it.name }), el("span", { "class": "val", text: it.value })]);
    }));
  }

  function renderRoutes(s, now) {
    var box = $("routes");
    var routes = s.routes || [];
    if (!routes.length) { replace(box, [el("p", { "class": "empty", text: "No routes configured." })]); return; }
    // Keep keyboard focus on a Reset button across re-renders.
    var focused = document.activeElement && document.activeElement.getAttribute("data-focus-key");
    // Stale routes first, then storm alarms, then by name as configured.
    var order = routes.slice().sort(function (a, b) {
      return (b.stale ? 2 : 0) + (b.storm && b.storm.alarm ? 1 : 0) - ((a.stale ? 2 : 0) + (a.storm && a.storm.alarm ? 1 : 0));
    });
    replace(box, order.map(function (r) { return routeCard(r, now); }));
    if (focused) {
      var again = box.querySelector('[data-focus-key="' + CSS.escape(focused) + '"]');
      if (again) again.focus();
    }
  }

  function routeCard(r, now) {
    var storm = r.storm || {}, guard = r.auth_guard || {};
    var cls = "card route" + (r.stale ? " is-stale" : storm.alarm ? " is-storm" : "");
    var badges = [];
    if (r.stale) badges.push(badge("bad", "⚠", "stale", "no successful request within the expected time"));
    else if (r.expect_traffic_within_s != null) badges.push(badge("ok", "✓", "traffic ok", "traffic seen within the expected time"));
    if (storm.alarm) badges.push(badge("warn", "↯", "storm alarm", "storm detector quarantined clients"));
    if (guard.tripped) badges.push(badge("bad", "⊘", "auth guard", "upstream 401s rewritten to 503"));
    if (r.shadow_mode) badges.push(badge("warn", "◐", "shadow", "some defences are in shadow mode: they report what they would shed and forward it"));
    var head = el("h3", null, [el("span", { text: r.name })].concat(badges));
    var silent = silentFor(r, now);
    var meta = el("p", { "class": "meta", text: "upstream " + (r.upstream || "?") + " · priority " + (r.priority || "normal") +
      " · last success " + (r.last_success == null ? "never" : fmtDur(silent) + " ago") +
      (r.expect_traffic_within_s != null ? " · expected within " + fmtDur(r.expect_traffic_within_s) : "") });

    var h = history[r.name] || [];
    var l = h.length ? h[h.length - 1] : null;
    var q = r.requests || {};
    var nums = el("div", { "class": "nums" }, [
      el("div", { "class": "num" }, [el("b", { text: l ? fmtRate(l.fwd + l.shed + l.err) : "–" }), el("span", { text: "req/s" })]),
      el("div", { "class": "num shed" }, [el("b", { text: l ? fmtRate(l.shed) : "–" }), el("span", { text: "shed/s" })]),
      el("div", { "class": "num" }, [el("b", { text: fmtInt(q.forwarded) }), el("span", { text: "forwarded total" })]),
      el("div", { "class": "num shed" }, [el("b", { text: fmtInt(q.shed) }), el("span", { text: "shed total" })]),
      el("div", { "class": "num" }, [el("b", { text: fmtInt(q.error) }), el("span", { text: "errors total" })])
    ].concat(r.shadow_mode || num(q.shadow) > 0 ? [
      // Shadow mode: what would have been shed, beside what was.
      el("div", { "class": "num would" }, [el("b", { text: l ? fmtRate(l.would) : "–" }), el("span", { text: "would shed/s" })]),
      el("div", { "class": "num would" }, [el("b", { text: fmtInt(q.shadow) }), el("span", { text: "would shed total" })])
    ] : []));

    var reasons = {};
    Object.keys(r.shed_by_reason || {}).forEach(function (k) { reasons[k] = true; });
    h.forEach(function (sm) { Object.keys(sm.reasons).forEach(function (k) { if (sm.reasons[k] > 0) reasons[k] = true; }); });
    var reasonList = Object.keys(reasons).sort();

    var reqChart = chart(h, [
      { colour: OUTCOME_COLOURS.forwarded, get: function (sm) { return sm.fwd; } },
      { colour: OUTCOME_COLOURS.error, get: function (sm) { return sm.err; } },
      { colour: OUTCOME_COLOURS.shed, get: function (sm) { return sm.shed; } }
    ], "Requests per second on " + r.name + " over 5 minutes: forwarded, errors and shed");
    var reqLegend = legend([
      { name: "forwarded", colour: OUTCOME_COLOURS.forwarded, value: l ? fmtRate(l.fwd) + "/s" : "" },
      { name: "error", colour: OUTCOME_COLOURS.error, value: l ? fmtRate(l.err) + "/s" : "" },
      { name: "shed", colour: OUTCOME_COLOURS.shed, value: l ? fmtRate(l.shed) + "/s" : "" }
    ]);
    var shedChart = chart(h, reasonList.map(function (k) {
      return { colour: colourOf(k), get: function (sm) { return sm.reasons[k] || 0; } };
    }), "Shed requests per second on " + r.name + " by reason over 5 minutes");
    var shedLegend = reasonList.length ? legend(reasonList.map(function (k) {
      return { name: k, colour: colourOf(k), value: (l ? fmtRate(l.reasons[k] || 0) + "/s · " : "") + fmtInt((r.shed_by_reason || {})[k] || 0) + " total" };
    })) : el("p", { "class": "empty", text: "Nothing shed." });

    var quarantine = null;
    if (storm.enabled) {
      var qs = storm.quarantined || {};
      var parts = Object.keys(qs).map(function (k) { return k + ": " + qs[k]; });
      quarantine = el("p", { "class": "meta", text: "storm detector on · quarantined " + (parts.join(", ") || "none") +
        (guard.enabled ? " · auth guard " + (guard.tripped ? "TRIPPED" : "armed") : "") });
    } else if (guard.enabled) {
      quarantine = el("p", { "class": "meta", text: "auth guard " + (guard.tripped ? "TRIPPED" : "armed") });
    }

    return el("article", { "class": cls, "aria-labelledby": "route-" + slug(r.name) }, [
      (head.id = "route-" + slug(r.name), head), meta, nums,
      el("h4", { text: "Requests / s" }), reqChart, reqLegend,
      el("h4", { text: "Shed / s by reason" }), shedChart, shedLegend,
      quarantine,
      el("h4", { text: "Top offending clients" }), offenders(r)
    ]);
  }
  function slug(s) { return String(s).replace(/[^A-Za-z0-9_-]/g, "_"); }

  function offenders(r) {
    var list = r.top_offenders || [];
    if (!list.length) return el("p", { "class": "empty", text: "No offenders." });
    return el("table", { "class": "table" }, [
      el("thead", null, [el("tr", null, [el("th", { scope: "col", text: "client" }), el("th", { scope: "col", text: "reason" }),
        el("th", { scope: "col", text: "shed" }), el("th", { scope: "col" }, [el("span", { "class": "sr-only", text: "action" })])])]),
      el("tbody", null, list.map(function (o) {
        var b = el("button", { type: "button", "class": "reset", "aria-label": "Reset client " + short(o.client, 200) + " on route " + r.name,
          "data-focus-key": r.name + "\u0000" + o.client, text: "↺ Reset" });
        b.addEventListener("click", function () { resetClient(r.name, o.client, b); });
        return el("tr", null, [clientCell(o.client), el("td", { text: o.reason || "–" }),
          el("td", { "class": "n", text: fmtInt(o.shed) }), el("td", null, [b])]);
      }))
    ]);
  }

  function renderUpstreams(s) {
    var ups = s.upstreams || [];
    if (!ups.length) { replace($("upstreams"), [el("p", { "class": "empty", text: "No upstreams." })]); return; }
    replace($("upstreams"), ups.map(function (u) {
      var c = u.circuit || "closed";
      var state = c === "open" ? badge("bad", "✖", "circuit open") : c === "half_open" ? badge("warn", "◐", "half-open") : badge("ok", "✓", "circuit closed");
      var pct = u.max_concurrency ? Math.min(100, 100 * num(u.in_flight) / u.max_concurrency) : 0;
      var eps = u.endpoints || [];
      var ejected = eps.filter(function (e) { return e.ejected; }).length;
      return el("article", { "class": "card" }, [
        el("h3", null, [el("span", { text: u.name }), state, ejected ? badge("bad", "⊘", ejected + " ejected") : null]),
        el("p", { "class": "meta", text: "in flight " + fmtInt(u.in_flight) + " of " + fmtInt(u.max_concurrency) }),
        el("div", { "class": "meter", role: "meter", "aria-label": "in-flight share of " + u.name, "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": Math.round(pct) },
          [el("span", { style: "width:" + pct.toFixed(1) + "%" })]),
        el("table", { "class": "table" }, [
          el("thead", null, [el("tr", null, [el("th", { scope: "col", text: "endpoint" }), el("th", { scope: "col", text: "state" }), el("th", { scope: "col", text: "in flight" })])]),
          el("tbody", null, eps.map(function (e) {
            return el("tr", null, [el("td", { "class": "mono", text: e.address }),
              el("td", { "class": e.ejected ? "state-bad" : "state-ok", text: e.ejected ? "⊘ ejected" : "✓ in service" }),
              el("td", { "class": "n", text: fmtInt(e.in_flight) })]);
          }))
        ])
      ]);
    }));
  }

  function kv(pairs) {
    var dl = el("dl", { "class": "kv" });
    pairs.forEach(function (p) {
      if (!p) return;
      dl.appendChild(el("dt", { text: p[0] }));
      dl.appendChild(el("dd", { "class": p[2] || null, text: p[1] }));
    });
    return dl;
  }

  function renderPlatform(s, now) {
    var st = s.store || {};
    replace($("store"), [el("h3", { text: "Store" }), kv([
      ["kind", st.kind || "?"],
      ["health", st.up === false ? "✖ DOWN" : "✓ up", st.up === false ? "state-bad" : "state-ok"],
      ["tracked clients", fmtInt(st.tracked_clients)]
    ])]);
    var cfg = s.config || {}, lr = cfg.last_reload;
    replace($("config"), [el("h3", { text: "Config" }), kv([
      ["version", cfg.hash || "–"],
      ["loaded", cfg.loaded_at != null ? fmtTime(cfg.loaded_at) + " (" + fmtDur(now - cfg.loaded_at) + " ago)" : "–"],
      ["last reload", !lr ? "none since start" : lr.result === "applied" ? "✓ applied at " + fmtTime(lr.at) : "✖ rejected at " + fmtTime(lr.at),
        !lr ? null : lr.result === "applied" ? "state-ok" : "state-bad"],
      lr && lr.error ? ["error", lr.error, "state-bad"] : null
    ])]);
    var certs = s.certificates || [];
    var certBox = $("certs");
    if (!certs.length) { replace(certBox, [el("h3", { text: "Certificates" }), el("p", { "class": "empty", text: "No TLS listener." })]); return; }
    replace(certBox, [el("h3", { text: "Certificates" }), el("table", { "class": "table" }, [
      el("thead", null, [el("tr", null, ["subject", "position", "not after", "left"].map(function (t) { return el("th", { scope: "col", text: t }); }))]),
      el("tbody", null, certs.map(function (c) {
        var d = c.days_left;
        var cls = d == null ? "" : d <= 0 ? "state-bad" : d < 14 ? "state-warn" : "state-ok";
        var txt = d == null ? "–" : d <= 0 ? "✖ expired" : (d < 14 ? "⚠ " : "✓ ") + Math.floor(d) + " days";
        return el("tr", null, [el("td", { "class": "client", text: c.subject }),
          el("td", { text: c.position === 0 ? "leaf" : String(c.position) }),
          el("td", { text: fmtDate(c.not_after) }), el("td", { "class": cls, text: txt })]);
      }))
    ])]);
  }

  function renderFeed() {
    var body = $("feed");
    if (!feed.length) { replace(body, [el("tr", null, [el("td", { colspan: 5, "class": "empty", text: "none yet" })])]); return; }
    replace(body, feed.map(function (e) {
      return el("tr", null, [el("td", { text: fmtTime(e.at) }), el("td", { text: e.route }),
        el("td", null, [el("span", { "class": "swatch", style: "background:" + colourOf(String(e.reason || "")), "aria-hidden": "true" }), " ", String(e.reason == null ? "" : e.reason) + (e.shadow ? " (shadow: forwarded)" : "")]),
        clientCell(e.client), el("td", { "class": "n", text: e.status })]);
    }));
  }

  // ---------- connection state ----------
  function tick() {
    var conn = $("conn");
    var age = lastDataAt ? (Date.now() - lastDataAt) / 1000 : Infinity;
    var icon = conn.querySelector(".conn-icon"), text = conn.querySelector(".conn-text");
    var cls, i, t;
    if (locked) { cls = "conn conn-down"; i = "⚿"; t = "admin token needed"; }
    else if (!lastDataAt) { cls = "conn conn-wait"; i = "…"; t = "connecting"; }
    else if (age > STALE_DATA_S) { cls = "conn conn-down"; i = "⚠"; t = "DISCONNECTED · last data " + fmtDur(age) + " ago"; }
    else { cls = "conn conn-live"; i = "●"; t = streaming ? "live" : "live (polling)"; }
    if (conn.className !== cls) conn.className = cls;
    if (icon.textContent !== i) icon.textContent = i;
    if (text.textContent !== t) text.textContent = t;
    document.body.classList.toggle("data-old", !!lastDataAt && age > STALE_DATA_S);
  }

  // ---------- the admin API, with the token when there is one ----------
  function tokenGet() { try { return sessionStorage.getItem("levee-admin-token"); } catch (e) { return null; } }
  function tokenSet(v) { try { if (v) sessionStorage.setItem("levee-admin-token", v); else sessionStorage.removeItem("levee-admin-token"); } catch (e) { /* private mode */ } }

  function api(path, opts) {
    opts = opts || {};
    var h = opts.headers || {};
    var token = tokenGet();
    if (token) h.Authorization = "Bearer " + token;
    opts.headers = h;
    opts.cache = "no-store";
    opts.credentials = "omit";
    return fetch(BASE + path, opts).then(function (r) {
      if (r.status === 401) askToken(token ? "That token was refused." : "");
      return r;
    });
  }

  function askToken(why) {
    tokenSet(null);
    var first = !locked;
    locked = true;
    var form = $("auth");
    form.hidden = false;
    setText("auth-msg", why || "");
    if (first) $("auth-token").focus();
    tick();
  }

  function unlock(ev) {
    ev.preventDefault();
    var input = $("auth-token");
    var token = input.value.trim();
    if (!token) return;
    tokenSet(token);
    input.value = "";
    locked = false;
    $("auth").hidden = true;
    setText("auth-msg", "");
    tick();
    poll();
    if (streamWanted) connect();
  }

  function poll() {
    if (fetching || locked) return;
    fetching = true;
    api("api/v1/state", { headers: { accept: "application/json" } })
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
      .then(ingest)
      .catch(function () { /* the watchdog shows "disconnected" */ })
      .then(function () { fetching = false; });
  }

  // One Server-Sent Events block ("event: x\ndata: {...}").
  function dispatch(block) {
    var name = "message", data = [];
    block.split("\n").forEach(function (line) {
      if (line.indexOf("event:") === 0) name = line.slice(6).trim();
      else if (line.indexOf("data:") === 0) data.push(line.slice(5).replace(/^ /, ""));
    });
    if (!data.length) return;
    var value;
    try { value = JSON.parse(data.join("\n")); } catch (e) { return; /* ignore a bad frame */ }
    if (name === "state") ingest(value);
    else if (name === "shed") ingestShed(value);
  }

  function connect() {
    streamWanted = true;
    if (streamOpen || locked) return;
    if (typeof ReadableStream === "undefined" || typeof TextDecoder === "undefined") return; // polling only
    streamOpen = true;
    api("api/v1/events", { headers: { accept: "text/event-stream" } })
      .then(function (r) {
        if (!r.ok || !r.body) throw new Error("HTTP " + r.status);
        var reader = r.body.getReader(), decoder = new TextDecoder(), buf = "";
        streaming = true;
        tick();
        function pump() {
          return reader.read().then(function (chunk) {
            if (chunk.done) throw new Error("the stream ended");
            buf += decoder.decode(chunk.value, { stream: true });
            var i;
            while ((i = buf.indexOf("\n\n")) >= 0) { dispatch(buf.slice(0, i)); buf = buf.slice(i + 2); }
            if (buf.length > EVENT_MAX) { reader.cancel(); throw new Error("oversized event"); }
            return pump();
          });
        }
        return pump();
      })
      .catch(function () { /* reopened below; polling covers the gap */ })
      .then(function () {
        streaming = false;
        streamOpen = false;
        tick();
        if (!locked) setTimeout(connect, RECONNECT_MS);
      });
  }

  // ---------- admin actions ----------
  function toast(msg) {
    var t = $("toast");
    t.textContent = msg;
    t.className = "toast show";
    clearTimeout(toast.timer);
    toast.timer = setTimeout(function () { t.className = "toast"; }, 6000);
  }
  function resetClient(route, client, button) {
    var path = "api/v1/clients/" + encodeURIComponent(client) + "?route=" + encodeURIComponent(route);
    button.disabled = true;
    api(path, { method: "DELETE" }).then(function (r) {
      if (r.status === 401) { toast("✖ Enter the admin token above, then reset again."); return; }
      return r;
    }).then(function (r) {
      if (!r) return;
      if (r.ok) { toast("✓ Reset " + short(client) + " on " + route + "."); poll(); return; }
      return r.text().then(function (body) {
        var why = body;
        try { var j = JSON.parse(body); why = j.error || j.message || body; } catch (e) { /* plain text */ }
        toast("✖ Reset of " + short(client) + " on " + route + " failed: HTTP " + r.status + (why ? " " + String(why).slice(0, 200) : ""));
      });
    }).catch(function (e) {
      toast("✖ Reset failed: " + (e && e.message ? e.message : "network error"));
    }).then(function () { button.disabled = false; });
  }

  // ---------- start ----------
  // Poll at once so the first paint has data, and keep polling every 2 s until
  // the event stream delivers. The stream opens only after STREAM_AFTER_MS: a
  // headless browser taking a snapshot with a virtual-time budget (the
  // integration test, wall-screen snapshot tools) pauses its clock while any
  // fetch is pending, so an open stream would keep it from ever finishing.
  $("auth").addEventListener("submit", unlock);
  poll();
  setTimeout(connect, STREAM_AFTER_MS);
  setInterval(function () {
    tick();
    // Fallback: the stream failed or went quiet; poll until it delivers again.
    if (!lastDataAt || Date.now() - lastDataAt > POLL_MS + 500) poll();
  }, 1000);
})();
