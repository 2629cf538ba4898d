// bootherd console: follows the server's pushed updates (server-sent events from
// /ui/events) and draws the storm chart as SVG.  No framework, nothing fetched from
// elsewhere.  Text from the server is only ever set with textContent.
(function () {
  "use strict";
  var body = document.body;
  var page = body.dataset.page || "";
  var nodeId = body.dataset.node || "";
  var COLORS = {
    idle: "#c9ccd1", dhcp: "#4e79a7", tftp: "#76b7b2", loader: "#f28e2b", waiting: "#edc948",
    os: "#b07aa1", setup: "#9c755f", up: "#59a14f", failed: "#e15759", down: "#8c8c8c"
  };
  var SVGNS = "http://www.w3.org/2000/svg";
  var MAX_POINTS = 2400;

  var phaseNames = [];
  var storm = null;          // {number, t0, step, ended, boot, hist, times[], samples[]}
  var offset = 0;            // server clock minus browser clock, seconds
  var generation = null;
  var stats = {updates: 0, hello: 0, nodeEvents: 0, lastSeq: -1, samples: 0,
               consoleChars: 0, consoleBacklogs: 0};
  window.bootherdConsole = stats;  // read by the browser tests

  function $(id) { return document.getElementById(id); }
  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    if (cls) { e.className = cls; }
    return e;
  }
  function svg(tag, attrs, text) {
    var e = document.createElementNS(SVGNS, tag);
    for (var k in attrs) { e.setAttribute(k, attrs[k]); }
    if (text !== undefined) { e.textContent = String(text); }
    return e;
  }
  function pad(n, w) { n = String(n); while (n.length < w) { n = "0" + n; } return n; }
  function when(ts) {
    if (ts === null || ts === undefined) { return "-"; }
    var d = new Date(ts * 1000);
    return d.getFullYear() + "-" + pad(d.getMonth() + 1, 2) + "-" + pad(d.getDate(), 2) + " " +
      pad(d.getHours(), 2) + ":" + pad(d.getMinutes(), 2) + ":" + pad(d.getSeconds(), 2) + "." +
      pad(d.getMilliseconds(), 3);
  }
  function ago(s) {  // as `bootherd node list` writes a time in state
    if (s === null || s === undefined || isNaN(s)) { return "-"; }
    s = Math.max(0, Math.floor(s));
    if (s < 120) { return s + "s"; }
    if (s < 7200) { return Math.floor(s / 60) + "m" + pad(s % 60, 2) + "s"; }
    return Math.floor(s / 3600) + "h" + pad(Math.floor(s % 3600 / 60), 2) + "m";
  }
  function serverNow() { return Date.now() / 1000 + offset; }
  function secs(v) { return v === null || v === undefined ? "-" : v.toFixed(2) + " s"; }

  // -- connection state ---------------------------------------------------------------
  function setLive(text, cls) {
    var l = $("live");
    if (l) { l.textContent = text; l.className = "live " + (cls || ""); }
  }
  function banner(text, link) {
    var b = $("banner");
    if (!b) { return; }
    b.textContent = text + " ";
    if (link) {
      var a = el("a", "Sign in again");
      a.href = "/ui/login?next=" + encodeURIComponent(location.pathname + location.search);
      b.appendChild(a);
    }
    b.hidden = false;
  }

  function connect() {
    var url = "/ui/events" + (nodeId ? "?node=" + encodeURIComponent(nodeId) + "&since=" +
                              encodeURIComponent(body.dataset.made) : "");
    var es = new EventSource(url);
    es.addEventListener("hello", function (e) {
      stats.hello += 1;
      setLive("live", "on");
      $("banner").hidden = true;
      onHello(JSON.parse(e.data));
    });
    es.addEventListener("tick", function (e) { onTick(JSON.parse(e.data)); });
    es.addEventListener("node", function (e) { onNodeEvents(JSON.parse(e.data)); });
    es.addEventListener("signedout", function () { es.close(); signedOut(); });
    es.onerror = function () {
      if (es.readyState === EventSource.CLOSED) {
        // The server refused the stream: the session is gone (or the node).
        signedOut();
      } else {
        setLive("reconnecting…", "off");
      }
    };
  }
  function signedOut() {
    setLive("signed out", "off");
    banner("Your session has ended; this page no longer updates.", true);
  }

  // -- overview and storm ----------------------------------------------------------------
  function onHello(h) {
    phaseNames = h.phase_names;
    offset = h.now - Date.now() / 1000;
    storm = h.storm;
    generation = h.generation;
    counts(h);
    if (h.failures) { failures(h.failures); }
    if (h.servers) { servers(h.servers); }
    if (h.node_events) { onNodeEvents(h.node_events); }
    drawStorm();
  }

  function onTick(t) {
    stats.updates += 1;
    stats.lastSeq = t.seq;
    offset = t.now - Date.now() / 1000;
    counts(t);
    if (t.storm) {
      if (!storm || storm.number !== t.storm.number) {
        storm = {times: [], samples: []};
      }
      var s = t.storm;
      storm.number = s.number; storm.t0 = s.t0; storm.step = s.step; storm.ended = s.ended;
      storm.boot = s.boot; storm.hist = s.hist;
      if (s.times) {  // a storm new to this console: its samples so far
        storm.times = s.times.slice();
        storm.samples = s.samples.slice();
      } else if (s.sample) {
        storm.times.push(s.sample[0]);
        storm.samples.push(s.sample[1]);
        if (storm.times.length > MAX_POINTS) {
          storm.times = storm.times.filter(function (_, i) { return i % 2 === 0; });
          storm.samples = storm.samples.filter(function (_, i) { return i % 2 === 0; });
        }
      }
      drawStorm();
    }
    if (t.failures) { failures(t.failures); }
    if (t.servers) { servers(t.servers); }
    if (page === "nodes" && t.seq !== nodesSeq) { nodesSeq = t.seq; refreshNodes(); }
    if (page === "node" && t.generation !== undefined && t.generation !== generation) {
      generation = t.generation;
      refreshDecision();
    }
  }

  function counts(m) {
    var total = $("total");
    if (total) { total.textContent = m.nodes; }
    var ph = $("phases");
    if (ph && m.phases) {
      phaseNames.forEach(function (n, i) {
        var row = ph.querySelector('tr[data-key="' + n + '"] td');
        if (row) { row.textContent = m.phases[i]; }
      });
    }
    var st = $("states");
    if (st && m.states) {
      var tb = st.tBodies[0];
      var rows = [];
      Object.keys(m.states).sort().forEach(function (k) {
        var tr = el("tr");
        tr.dataset.key = k;
        var th = el("th");
        var a = el("a", k);
        a.href = "/ui/nodes?state=" + encodeURIComponent(k);
        th.appendChild(a);
        tr.appendChild(th);
        tr.appendChild(el("td", m.states[k], "num"));
        rows.push(tr);
      });
      tb.replaceChildren.apply(tb, rows);
    }
  }

  function failures(list) {
    var t = $("failures");
    if (!t) { return; }
    var tb = t.tBodies[0];
    var rows = list.slice(0, 15).map(function (f) {
      var tr = el("tr");
      tr.appendChild(el("td", when(f.ts)));
      var td = el("td");
      var a = el("a", f.node_id);
      a.href = "/ui/nodes/" + encodeURIComponent(f.node_id);
      td.appendChild(a);
      tr.appendChild(td);
      tr.appendChild(el("td", f.state));
      tr.appendChild(el("td", f.source));
      tr.appendChild(el("td", f.detail));
      return tr;
    });
    if (!rows.length) {
      var tr = el("tr", null, "none");
      var td = el("td", "none", "muted");
      td.colSpan = 5;
      tr.appendChild(td);
      rows = [tr];
    }
    tb.replaceChildren.apply(tb, rows);
  }

  function servers(list) {
    var t = $("servers");
    if (!t) { return; }
    var tb = t.tBodies[0];
    tb.replaceChildren.apply(tb, list.map(function (s) {
      var tr = el("tr", null, s.alive ? "alive" : "silent");
      tr.appendChild(el("td", s.name));
      tr.appendChild(el("td", (s.roles || "").split(",").join(", ")));
      tr.appendChild(el("td", s.address));
      var age = serverNow() - s.heartbeat;
      tr.appendChild(el("td", (s.alive ? "" : "silent: ") + ago(age) + " ago"));
      return tr;
    }));
  }

  function drawStorm() {
    stats.samples = storm && storm.times ? storm.times.length : 0;
    var title = $("storm-title");
    if (title) {
      title.textContent = storm ? "#" + storm.number + (storm.ended ? " (ended)" : " (live)") +
        " · started " + when(storm.t0) : "none yet";
    }
    var pct = $("percentiles");
    if (pct && storm && storm.boot) {
      var b = storm.boot;
      ["p50", "p95", "p99", "max"].forEach(function (k) {
        pct.querySelector('[data-k="' + k + '"]').textContent = secs(b[k]);
      });
      ["up", "failed", "started"].forEach(function (k) {
        pct.querySelector('[data-k="' + k + '"]').textContent = b[k];
      });
    }
    var chart = $("chart");
    if (chart) { stackedChart(chart); }
    var hist = $("hist");
    if (hist) { histogram(hist); }
  }

  function niceStep(range, n) {
    var raw = range / Math.max(1, n);
    var mag = Math.pow(10, Math.floor(Math.log10(raw || 1)));
    var f = raw / mag;
    return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * mag;
  }

  function axes(g, x0, y0, w, h, xmax, ymax, xlabel, ylabel) {
    var xs = niceStep(xmax, 8), ys = niceStep(ymax, 5), v;
    var digits = xs < 1 ? Math.ceil(-Math.log10(xs) - 1e-9) : 0;
    for (v = 0; v <= ymax + 1e-9; v += ys) {
      var y = y0 + h - v / ymax * h;
      g.appendChild(svg("line", {x1: x0, x2: x0 + w, y1: y, y2: y, "class": "grid"}));
      g.appendChild(svg("text", {x: x0 - 6, y: y + 4, "text-anchor": "end", "class": "tick"},
                        Math.round(v)));
    }
    for (v = 0; v <= xmax + 1e-9; v += xs) {
      var x = x0 + v / xmax * w;
      g.appendChild(svg("line", {x1: x, x2: x, y1: y0 + h, y2: y0 + h + 4, "class": "axis"}));
      g.appendChild(svg("text", {x: x, y: y0 + h + 16, "text-anchor": "middle", "class": "tick"},
                        v.toFixed(digits)));
    }
    g.appendChild(svg("line", {x1: x0, x2: x0 + w, y1: y0 + h, y2: y0 + h, "class": "axis"}));
    g.appendChild(svg("line", {x1: x0, x2: x0, y1: y0, y2: y0 + h, "class": "axis"}));
    g.appendChild(svg("text", {x: x0 + w / 2, y: y0 + h + 32, "text-anchor": "middle",
                               "class": "label"}, xlabel));
    g.appendChild(svg("text", {x: 12, y: y0 + h / 2, "text-anchor": "middle", "class": "label",
                               transform: "rotate(-90 12 " + (y0 + h / 2) + ")"}, ylabel));
  }

  function stackedChart(box) {
    var W = Math.max(320, box.clientWidth), H = parseInt(box.dataset.height || "260", 10);
    var root = svg("svg", {width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img"});
    var x0 = 52, y0 = 10, w = W - x0 - 130, h = H - y0 - 44;
    if (!storm || !storm.times || !storm.times.length) {
      root.appendChild(svg("text", {x: W / 2, y: H / 2, "text-anchor": "middle", "class": "muted"},
                           "No storm yet: the chart starts with the first node that boots."));
      box.replaceChildren(root);
      return;
    }
    var T = storm.times, S = storm.samples, n = T.length;
    var xmax = Math.max(T[n - 1], 0.1);
    var total = 0;
    S[n - 1].forEach(function (c) { total += c; });
    var ymax = Math.max(total, 1);
    var used = phaseNames.map(function (_, i) {
      return S.some(function (s) { return s[i] > 0; });
    });
    var g = svg("g", {});
    axes(g, x0, y0, w, h, xmax, ymax, "seconds since the first boot event", "nodes");
    var below = new Array(n).fill(0);
    phaseNames.forEach(function (name, i) {
      if (!used[i]) { return; }
      var top = [], bottom = [];
      for (var k = 0; k < n; k++) {
        var x = x0 + T[k] / xmax * w;
        var lo = below[k], hi = below[k] + S[k][i];
        bottom.push(x.toFixed(1) + "," + (y0 + h - lo / ymax * h).toFixed(1));
        top.push(x.toFixed(1) + "," + (y0 + h - hi / ymax * h).toFixed(1));
        below[k] = hi;
      }
      var d = "M" + top.join("L") + "L" + bottom.reverse().join("L") + "Z";
      var p = svg("path", {d: d, fill: COLORS[name] || "#999", "class": "layer"});
      p.appendChild(svg("title", {}, name));
      g.appendChild(p);
    });
    // Legend: the phases in chart order, with the newest count.
    var ly = y0 + 4;
    phaseNames.slice().reverse().forEach(function (name) {
      var i = phaseNames.indexOf(name);
      if (!used[i]) { return; }
      g.appendChild(svg("rect", {x: x0 + w + 14, y: ly, width: 12, height: 12,
                                 fill: COLORS[name] || "#999"}));
      g.appendChild(svg("text", {x: x0 + w + 32, y: ly + 10, "class": "legend"},
                        name + " " + S[n - 1][i]));
      ly += 18;
    });
    root.appendChild(g);
    box.replaceChildren(root);
  }

  function histogram(box) {
    var W = Math.max(320, box.clientWidth), H = parseInt(box.dataset.height || "180", 10);
    var root = svg("svg", {width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img"});
    var hist = storm && storm.hist;
    if (!hist || !hist.counts.length) {
      root.appendChild(svg("text", {x: W / 2, y: H / 2, "text-anchor": "middle", "class": "muted"},
                           "No node has booted in this storm yet."));
      box.replaceChildren(root);
      return;
    }
    var x0 = 52, y0 = 22, w = W - x0 - 130, h = H - y0 - 44;
    var c = hist.counts, lo = hist.lo, span = hist.width * c.length;
    var ymax = Math.max.apply(null, c.concat([1]));
    var xmax = lo + span;
    var g = svg("g", {});
    axes(g, x0, y0, w, h, xmax, ymax, "boot time (s)", "nodes");
    c.forEach(function (v, i) {
      var xa = x0 + (lo + i * hist.width) / xmax * w, xb = x0 + (lo + (i + 1) * hist.width) / xmax * w;
      var y = y0 + h - v / ymax * h;
      g.appendChild(svg("rect", {x: xa, y: y, width: Math.max(1, xb - xa - 1), height: y0 + h - y,
                                 fill: COLORS.up}));
    });
    [["p50", "6 3"], ["p99", "2 2"]].forEach(function (q) {
      var v = storm.boot[q[0]];
      if (v === null || v === undefined) { return; }
      var x = x0 + v / xmax * w;
      g.appendChild(svg("line", {x1: x, x2: x, y1: y0, y2: y0 + h, stroke: "#222",
                                 "stroke-dasharray": q[1]}));
      g.appendChild(svg("text", {x: x + 4, y: y0 - 8, "class": "legend"},
                        q[0] + " " + v.toFixed(2) + " s"));
    });
    root.appendChild(g);
    box.replaceChildren(root);
  }

  // -- nodes table -----------------------------------------------------------------------
  var nodesBusy = false, nodesAt = 0, nodesAgain = null, nodesSeq = null;
  function refreshNodes() {
    var t = $("nodes");
    if (!t || nodesBusy) { return; }
    var wait = 1500 - (Date.now() - nodesAt);
    if (wait > 0) {
      if (!nodesAgain) { nodesAgain = setTimeout(function () { nodesAgain = null; refreshNodes(); }, wait); }
      return;
    }
    nodesBusy = true;
    nodesAt = Date.now();
    fetch("/ui/nodes.json?" + t.dataset.query, {credentials: "same-origin",
                                                headers: {Accept: "application/json"}})
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (res) { if (res) { nodeRows(t, res); } })
      .catch(function () {})
      .then(function () { nodesBusy = false; });
  }
  function nodeRows(t, res) {
    $("matched").textContent = res.matched + " of " + res.total;
    var tb = t.tBodies[0];
    var old = tb.rows;
    // Rows that did not change stay as they are (a link under the pointer keeps working).
    var rows = res.rows.map(function (r, i) {
      var sig = [r.state, r.since, r.experiment, r.ip, r.last_ts, r.phase].join("|");
      if (old[i] && old[i].dataset.node === r.node_id && old[i].dataset.sig === sig) {
        return old[i];
      }
      var tr = nodeRow(r);
      tr.dataset.sig = sig;
      return tr;
    });
    tb.replaceChildren.apply(tb, rows);
  }
  function nodeRow(r) {
    var tr = el("tr");
    tr.dataset.node = r.node_id;
    var td = el("td"), a = el("a", r.node_id);
    a.href = "/ui/nodes/" + encodeURIComponent(r.node_id);
    td.appendChild(a);
    tr.appendChild(td);
    td = el("td");
    td.appendChild(el("span", r.state || "UNKNOWN", "st ph-" + r.phase));
    tr.appendChild(td);
    td = el("td", ago(r.seconds), "num");
    td.dataset.since = r.since === null ? "" : r.since;
    tr.appendChild(td);
    td = el("td", r.experiment);
    if (r.vname) { td.appendChild(el("span", " (" + r.vname + ")", "muted")); }
    tr.appendChild(td);
    tr.appendChild(el("td", r.ip));
    tr.appendChild(el("td", r.type));
    td = el("td");
    if (r.last_ts) {
      td.appendChild(document.createTextNode(when(r.last_ts) + " "));
      td.appendChild(el("span", r.last_source, "muted"));
      td.appendChild(document.createTextNode(" " + r.last_detail));
    }
    tr.appendChild(td);
    return tr;
  }
  function ageCells() {
    var cells = document.querySelectorAll("[data-since]");
    var now = serverNow();
    for (var i = 0; i < cells.length; i++) {
      var s = cells[i].dataset.since;
      if (s !== "") { cells[i].textContent = ago(now - parseFloat(s)); }
    }
  }

  // -- node page -------------------------------------------------------------------------
  function onNodeEvents(list) {
    stats.nodeEvents += list.length;
    var t = $("events");
    if (!t) { return; }
    var tb = t.tBodies[0];
    var none = tb.querySelector("tr.none");
    if (none) { none.remove(); }
    list.forEach(function (e) {
      var key = e.ts + "|" + e.state + "|" + e.source;
      if (tb.querySelector('tr[data-key="' + CSS.escape(key) + '"]')) { return; }  // shown
      var tr = el("tr", null, "new");
      tr.dataset.key = key;
      tr.appendChild(el("td", when(e.ts)));
      tr.appendChild(el("td", e.state));
      tr.appendChild(el("td", e.source));
      tr.appendChild(el("td", e.detail));
      tb.insertBefore(tr, tb.firstChild);
      var st = e.note ? null : $("node-state");  // a note (power, a fetch) is not a state
      if (st) {
        if (st.textContent !== e.state) {
          var since = $("node-since");
          if (since) { since.dataset.since = e.ts; }
        }
        st.textContent = e.state;
        st.className = "st ph-" + e.phase;
      }
    });
  }
  function refreshDecision() {
    fetch("/ui/nodes/" + encodeURIComponent(nodeId) + "/decision",
          {credentials: "same-origin"})
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (!html) { return; }
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.getElementById("decision"), old = $("decision");
        if (fresh && old) { old.replaceWith(document.importNode(fresh, true)); }
      })
      .catch(function () {});
  }
  function actions() {
    var forms = document.querySelectorAll("form.action");
    var out = $("action-result");
    Array.prototype.forEach.call(forms, function (f) {
      f.addEventListener("submit", function (ev) {
        ev.preventDefault();
        var question = f.dataset.confirm;
        var sel = f.querySelector("select");
        if (sel) { question += " (" + (sel.value || "none") + ")"; }
        if (!window.confirm(question)) { return; }
        var button = f.querySelector("button");
        button.disabled = true;
        var data = new FormData(f);
        data.append("confirmed", "1");
        out.hidden = false;
        out.className = "result";
        out.textContent = "…";
        fetch(f.action, {method: "POST", body: data, credentials: "same-origin",
                         headers: {Accept: "application/json", "X-CSRF-Token": body.dataset.csrf}})
          .then(function (r) {
            return r.json().catch(function () { return {error: r.statusText}; })
              .then(function (j) { return {status: r.status, body: j}; });
          })
          .then(function (r) {
            if (r.status === 200) {
              out.className = "result ok";
              out.textContent = "Done: " + r.body.result;
            } else {
              out.className = "result bad";
              out.textContent = "Refused (" + r.status + "): " + (r.body.error || "");
              if (r.status === 401) {
                out.appendChild(document.createTextNode(" "));
                var a = el("a", "Sign in again");
                a.href = "/ui/login?next=" + encodeURIComponent(location.pathname);
                out.appendChild(a);
              }
            }
          })
          .catch(function (e) {
            out.className = "result bad";
            out.textContent = "No answer from the server: " + e;
          })
          .then(function () { button.disabled = false; });
      });
    });
  }

  // -- a node's serial console -------------------------------------------------------------
  var CONSOLE_KEEP = 256 * 1024;  // characters kept on the page
  function followConsole() {
    var pre = $("console-text"), status = $("console-status");
    if (!pre || !pre.dataset.live) { return; }
    var es = new EventSource("/ui/nodes/" + encodeURIComponent(nodeId) + "/console/events");
    function atBottom() { return pre.scrollHeight - pre.scrollTop - pre.clientHeight < 8; }
    function show(text, replace) {
      var follow = atBottom();
      if (replace) { pre.textContent = text; } else { pre.appendChild(document.createTextNode(text)); }
      if (pre.textContent.length > CONSOLE_KEEP) {
        pre.textContent = pre.textContent.slice(-CONSOLE_KEEP);
      }
      stats.consoleChars += text.length;
      if (follow) { pre.scrollTop = pre.scrollHeight; }
    }
    es.addEventListener("backlog", function (e) {
      var d = JSON.parse(e.data);
      stats.consoleBacklogs += 1;
      show(d.text, true);
      if (status) {
        status.textContent = d.status.console + ": " +
          (d.status.connected ? "connected, live" : "not connected (" + (d.status.error || "waiting") +
                                "), retrying");
      }
    });
    es.addEventListener("text", function (e) { show(JSON.parse(e.data).text, false); });
    es.addEventListener("closed", function () {
      es.close();
      if (status) { status.textContent = "Capture stopped on this server; reload to follow again."; }
    });
    es.addEventListener("signedout", function () { es.close(); });
  }

  // -- start -----------------------------------------------------------------------------
  var hello = $("hello");
  if (hello) { onHello(JSON.parse(hello.textContent)); }
  if (page === "node") { actions(); followConsole(); }
  if (page) { connect(); }
  setInterval(ageCells, 1000);
  var resized = null;
  window.addEventListener("resize", function () {
    clearTimeout(resized);
    resized = setTimeout(drawStorm, 150);
  });
})();
