/*
 * Handwritten digit recognition: the page's only script. Plain browser
 * JavaScript: no build step, no libraries, nothing fetched from elsewhere.
 *
 * Protocol (Files/keras_flask.py): POST <backend>/predict/ with the canvas
 * data URL as the raw body and "Accept: application/json"; the back-end
 * answers {"digit": d, "probabilities": [10 floats], ...} or, on error,
 * 4xx/5xx {"error": "reason"}. The body is sent as text/plain so that the
 * request stays a CORS "simple request" (no preflight). A 502/503/504, a network error or
 * no answer is asked once more after 400 ms, within the same timeoutMs (see predict()).
 *
 * Corrections: after an answer the page offers ten buttons ("wrong? pick the right
 * digit"); a click POSTs <backend>/feedback as JSON {label, predicted, probabilities,
 * model_sha256, input (the 28x28 the model saw, from the answer), image (the drawing)}
 * and the back-end answers 201 once it is stored. Nothing about the person is sent.
 *
 * The pure helpers are exported as window.DigitsApp for tests.
 */
(function (global) {
  "use strict";

  var SIZE = 280;              // logical canvas size, and the size of the posted PNG
  var LINE_WIDTH = 20;         // in logical pixels: about MNIST's stroke once scaled to 20x20
  var INK = "#111111";
  var PAPER = "#ffffff";
  var DEFAULT_PORT = 5000;
  var DEFAULT_TIMEOUT_MS = 10000;
  var RETRY_PAUSE_MS = 400;    // before the one retry of a /predict/ a balancer or back-end failed

  /* ---------- pure helpers (exported) ---------- */

  // The back-end's base URL (no trailing slash) from the config and the page's location.
  // backendUrl null/empty: the host that served the page, port 5000.
  function backendBase(config, loc) {
    var url = config && config.backendUrl;
    if (url) {
      return new URL(String(url), loc.href).href.replace(/\/+$/, "");
    }
    var host = loc.hostname || "localhost";          // "" when the page is opened as a file
    if (host.indexOf(":") !== -1 && host.charAt(0) !== "[") host = "[" + host + "]";
    var proto = loc.protocol === "https:" ? "https:" : "http:";
    return proto + "//" + host + ":" + DEFAULT_PORT;
  }

  function predictUrl(base) {
    return base + "/predict/";
  }

  function feedbackUrl(base) {
    return base + "/feedback";
  }

  // The correction the page sends: what the model answered and saw, and the right label.
  function correctionBody(answer, label) {
    var body = { label: label, predicted: answer.digit, image: answer.image };
    if (answer.probabilities) body.probabilities = answer.probabilities;
    if (answer.model && typeof answer.model.sha256 === "string") body.model_sha256 = answer.model.sha256;
    if (typeof answer.input === "string") body.input = answer.input;
    return body;
  }

  function timeoutMs(config) {
    var t = config && Number(config.timeoutMs);
    return t > 0 ? t : DEFAULT_TIMEOUT_MS;
  }

  // A /predict/ answer worth one retry: the balancer's or a dying back-end's, not the drawing's.
  function retriable(status) {
    return status === 502 || status === 503 || status === 504;
  }

  function isProbability(p) {
    return typeof p === "number" && isFinite(p) && p >= 0;
  }

  // Turns the back-end's answer into {digit, probabilities} or {error}.
  function interpretReply(status, contentType, text) {
    var data = null;
    if (/json/i.test(contentType || "")) {
      try { data = JSON.parse(text); } catch (e) { data = null; }
    }
    if (status < 200 || status >= 300) {
      var reason = data && typeof data.error === "string" ? data.error.trim() : "";
      if (!reason && data === null && text && text.length < 200 && !/[<>]/.test(text)) {
        reason = text.trim();
      }
      return { error: reason, status: status };
    }
    if (data === null || typeof data !== "object") {
      // A back-end of the guide's era answers the digit as plain text.
      var m = /^\s*([0-9])\s*$/.exec(text || "");
      if (m) return { digit: Number(m[1]), probabilities: null };
      return { error: "the answer was not understood", status: status };
    }
    var digit = data.digit;
    if (typeof digit === "string" && /^[0-9]$/.test(digit)) digit = Number(digit);
    if (typeof digit !== "number" || digit % 1 !== 0 || digit < 0 || digit > 9) {
      return { error: "the answer had no digit", status: status };
    }
    var probs = data.probabilities;
    if (!(Array.isArray(probs) && probs.length === 10 && probs.every(isProbability))) {
      probs = null;
    }
    var input = typeof data.input === "string" ? data.input : null;   // the 28x28 the model saw
    return { digit: digit, probabilities: probs, model: data.model || null, input: input };
  }

  function formatPercent(p) {
    return (p * 100).toFixed(1) + "%";
  }

  function capitalise(s) {
    return s.charAt(0).toUpperCase() + s.slice(1);
  }

  function errorMessage(reply) {
    var reason = reply.error ? reply.error.replace(/[.\s]+$/, "") : "";
    if (reply.status >= 400 && reply.status < 500) {
      return reason ? capitalise(reason) + "." :
        "The back-end refused the drawing (HTTP " + reply.status + ").";
    }
    if (reply.status >= 500) {
      return "The back-end failed (HTTP " + reply.status + ")" + (reason ? ": " + reason : "") + ".";
    }
    return "Unexpected answer from the back-end" + (reason ? ": " + reason : "") + ".";
  }

  var api = {
    SIZE: SIZE,
    RETRY_PAUSE_MS: RETRY_PAUSE_MS,
    retriable: retriable,
    backendBase: backendBase,
    predictUrl: predictUrl,
    feedbackUrl: feedbackUrl,
    correctionBody: correctionBody,
    interpretReply: interpretReply,
    formatPercent: formatPercent,
    errorMessage: errorMessage
  };
  global.DigitsApp = api;

  /* ---------- the page ---------- */

  function start(doc) {
    var canvas = doc.getElementById("pad");
    var predictBtn = doc.getElementById("predict");
    var clearBtn = doc.getElementById("clear");
    var resultCard = doc.getElementById("result");
    var digitEl = doc.getElementById("digit");
    var statusEl = doc.getElementById("status");
    var barsEl = doc.getElementById("bars");
    var backendEl = doc.getElementById("backend");
    var correctEl = doc.getElementById("correct");
    var correctStatusEl = doc.getElementById("correct-status");
    var fixButtons = correctEl ? Array.prototype.slice.call(correctEl.querySelectorAll("button[data-digit]")) : [];
    if (!canvas || !canvas.getContext) return;

    var config = global.DIGITS_CONFIG || {};
    var base = null;
    try {
      base = backendBase(config, global.location);
    } catch (e) {
      base = null;
    }
    api.backend = base;
    if (backendEl) backendEl.textContent = base || "invalid backendUrl in static/config.js";

    /* -- canvas: backing store at the device pixel ratio, drawn in 280x280 units -- */
    var dpr = Math.max(1, Math.min(global.devicePixelRatio || 1, 3));
    canvas.width = Math.round(SIZE * dpr);
    canvas.height = Math.round(SIZE * dpr);
    var ctx = canvas.getContext("2d");
    var hasInk = false;

    function resetCanvas() {
      ctx.setTransform(1, 0, 0, 1, 0, 0);
      ctx.fillStyle = PAPER;
      ctx.fillRect(0, 0, canvas.width, canvas.height);
      ctx.setTransform(canvas.width / SIZE, 0, 0, canvas.height / SIZE, 0, 0);
      ctx.lineCap = "round";
      ctx.lineJoin = "round";
      ctx.lineWidth = LINE_WIDTH;
      ctx.strokeStyle = INK;
      ctx.fillStyle = INK;
      hasInk = false;
    }

    // The drawing as a 280x280 PNG data URL, whatever the screen's pixel ratio.
    function snapshot() {
      if (canvas.width === SIZE && canvas.height === SIZE) return canvas.toDataURL("image/png");
      var off = doc.createElement("canvas");
      off.width = SIZE;
      off.height = SIZE;
      var octx = off.getContext("2d");
      octx.imageSmoothingEnabled = true;
      octx.imageSmoothingQuality = "high";
      octx.drawImage(canvas, 0, 0, SIZE, SIZE);
      return off.toDataURL("image/png");
    }
    api.snapshot = snapshot;

    function point(e) {
      var rect = canvas.getBoundingClientRect();
      var w = canvas.clientWidth || rect.width;
      var h = canvas.clientHeight || rect.height;
      return {
        x: (e.clientX - rect.left - canvas.clientLeft) * SIZE / w,
        y: (e.clientY - rect.top - canvas.clientTop) * SIZE / h
      };
    }

    var stroke = null;     // {id, x, y} while a pointer is down

    function dot(p) {
      ctx.beginPath();
      ctx.arc(p.x, p.y, LINE_WIDTH / 2, 0, 2 * Math.PI);
      ctx.fill();
    }

    function segment(a, b) {
      ctx.beginPath();
      ctx.moveTo(a.x, a.y);
      ctx.lineTo(b.x, b.y);
      ctx.stroke();
    }

    canvas.addEventListener("pointerdown", function (e) {
      if (stroke || (e.pointerType === "mouse" && e.button !== 0)) return;
      e.preventDefault();
      try { canvas.setPointerCapture(e.pointerId); } catch (err) { /* not capturable */ }
      var p = point(e);
      stroke = { id: e.pointerId, x: p.x, y: p.y };
      dot(p);
      hideCorrection();                            // the buttons were about the drawing as answered
      if (!hasInk) markStale();
      hasInk = true;
    });

    canvas.addEventListener("pointermove", function (e) {
      if (!stroke || e.pointerId !== stroke.id) return;
      e.preventDefault();
      var events = (e.getCoalescedEvents && e.getCoalescedEvents()) || [];
      if (!events.length) events = [e];
      for (var i = 0; i < events.length; i++) {
        var p = point(events[i]);
        segment(stroke, p);
        stroke.x = p.x;
        stroke.y = p.y;
      }
    });

    function endStroke(e) {
      if (stroke && e.pointerId === stroke.id) stroke = null;
    }
    canvas.addEventListener("pointerup", endStroke);
    canvas.addEventListener("pointercancel", endStroke);
    canvas.addEventListener("lostpointercapture", endStroke);
    canvas.addEventListener("contextmenu", function (e) { e.preventDefault(); });

    /* -- result area -- */
    var bars = [];
    for (var d = 0; d < 10; d++) {
      var li = doc.createElement("li");
      li.className = "bar";
      li.setAttribute("data-digit", String(d));
      li.innerHTML = '<span class="bar-label">' + d + '</span>' +
        '<span class="bar-track" aria-hidden="true"><span class="bar-fill"></span></span>' +
        '<span class="bar-value">&ndash;</span>';
      barsEl.appendChild(li);
      bars.push({
        li: li,
        fill: li.querySelector(".bar-fill"),
        value: li.querySelector(".bar-value")
      });
    }

    function setStatus(text, kind) {
      statusEl.textContent = text;
      statusEl.className = "message" + (kind ? " " + kind : "");
    }

    function resetResult() {
      hideCorrection();
      digitEl.textContent = "?";
      resultCard.classList.remove("has-result", "stale");
      barsEl.classList.remove("has-result", "stale");
      bars.forEach(function (b) {
        b.li.classList.remove("top");
        b.li.removeAttribute("data-probability");
        b.fill.style.width = "0";
        b.value.textContent = "\u2013";
      });
    }

    // Drawing again after an answer: the answer no longer matches the drawing.
    function markStale() {
      if (resultCard.classList.contains("has-result")) {
        resultCard.classList.add("stale");
        barsEl.classList.add("stale");
      }
    }

    function showResult(r) {
      resetResult();
      digitEl.textContent = String(r.digit);
      resultCard.classList.add("has-result");
      var text = "Predicted digit: " + r.digit;
      if (r.probabilities) {
        var total = r.probabilities.reduce(function (s, p) { return s + p; }, 0) || 1;
        r.probabilities.forEach(function (raw, i) {
          var p = raw / total;
          bars[i].li.setAttribute("data-probability", String(p));
          bars[i].fill.style.width = (p * 100).toFixed(2) + "%";
          bars[i].value.textContent = formatPercent(p);
        });
        bars[r.digit].li.classList.add("top");
        barsEl.classList.add("has-result");
        text += " (" + formatPercent(r.probabilities[r.digit] / total) + " sure).";
      } else {
        text += ".";
      }
      setStatus(text, "ok");
      offerCorrection(r);
    }

    /* -- corrections: "wrong? pick the right digit" -- */
    var answered = null;       // the answer the buttons would correct, with the drawing sent
    var correctionSeq = 0;

    function hideCorrection() {
      answered = null;
      correctionSeq++;
      if (correctEl) correctEl.hidden = true;
    }

    function offerCorrection(r) {
      if (!correctEl || !r.image) return;
      answered = r;
      correctEl.hidden = false;
      correctStatusEl.textContent = "";
      correctStatusEl.className = "message";
      fixButtons.forEach(function (b) {
        var d = Number(b.getAttribute("data-digit"));
        b.disabled = d === r.digit;               // the model's answer is not a correction
        b.setAttribute("aria-pressed", "false");
        b.setAttribute("aria-label", d === r.digit ? d + " (the model's answer)" : "It is a " + d);
      });
    }

    function sendCorrection(label) {
      if (!answered || !base) return;
      var mine = ++correctionSeq;
      var body = JSON.stringify(correctionBody(answered, label));
      fixButtons.forEach(function (b) {
        b.disabled = true;
        b.setAttribute("aria-pressed", String(Number(b.getAttribute("data-digit")) === label));
      });
      correctStatusEl.className = "message busy";
      correctStatusEl.textContent = "Sending\u2026";
      fetch(feedbackUrl(base), {
        method: "POST",
        body: body,
        headers: { "Content-Type": "application/json", "Accept": "application/json" },
        mode: "cors",
        credentials: "omit"
      }).then(function (res) {
        return res.text().then(function (text) {
          return { status: res.status, type: res.headers.get("Content-Type"), text: text };
        });
      }).then(function (reply) {
        if (mine !== correctionSeq) return;
        if (reply.status >= 200 && reply.status < 300) {
          correctStatusEl.className = "message ok";
          correctStatusEl.textContent = "Thank you! Saved as a " + label + ": it helps the model learn.";
          return;
        }
        var data = null;
        try { data = JSON.parse(reply.text); } catch (e) { data = null; }
        var reason = data && typeof data.error === "string" ? data.error : "HTTP " + reply.status;
        failCorrection("The correction was not saved (" + reason.replace(/[.\s]+$/, "") + ").");
      }, function () {
        if (mine !== correctionSeq) return;
        failCorrection("The correction was not saved: cannot reach the back-end at " + base + ".");
      });
    }

    function failCorrection(text) {
      correctStatusEl.className = "message error";
      correctStatusEl.textContent = text;
      fixButtons.forEach(function (b) {            // let the person try again
        b.disabled = answered !== null && Number(b.getAttribute("data-digit")) === answered.digit;
      });
    }

    fixButtons.forEach(function (b) {
      b.addEventListener("click", function () { sendCorrection(Number(b.getAttribute("data-digit"))); });
    });

    function showError(text) {
      resetResult();
      setStatus(text, "error");
    }

    // On a small screen the answer may be below the fold: bring it into view.
    function reveal() {
      var rect = resultCard.getBoundingClientRect();
      var height = global.innerHeight || doc.documentElement.clientHeight;
      if (rect.bottom > height || rect.top < 0) {
        resultCard.scrollIntoView({ block: "nearest", behavior: "smooth" });
      }
    }

    /* -- talking to the back-end -- */
    var seq = 0;
    var inflight = null;

    function abortInflight() {
      seq++;
      if (inflight) inflight.abort();
      inflight = null;
      resultCard.removeAttribute("aria-busy");
    }

    // One /predict/ request, tried at most twice. A prediction is idempotent (the same drawing
    // gets the same answer, nothing is stored), so a try that a balancer or a dying back-end
    // failed (502, 503, 504, no connection, no answer) is asked again once, after a pause:
    // the balancer sends it to another back-end. Never a 4xx (the drawing is the problem), and
    // never /feedback (a correction must not be stored twice). Both tries fit in timeoutMs:
    // the first is given half of it (an ALB holds a request to a dead back-end for 60 s), the
    // retry what is left.
    function predict() {
      abortInflight();
      var mine = seq;
      resetResult();
      if (!base) {
        showError("The back-end address in static/config.js is not a valid URL.");
        return;
      }
      var url = predictUrl(base);
      var limit = timeoutMs(config);
      var deadline = Date.now() + limit;
      resultCard.setAttribute("aria-busy", "true");
      setStatus("Asking the model\u2026", "busy");
      var drawing = snapshot();

      function finish() {
        if (mine !== seq) return;
        inflight = null;
        resultCard.removeAttribute("aria-busy");
        reveal();
      }

      // True when the retry is under way: there is time left for it after the pause.
      function again(tries) {
        if (tries > 1 || deadline - Date.now() <= RETRY_PAUSE_MS) return false;
        setStatus("Asking the model again\u2026", "busy");
        setTimeout(function () { if (mine === seq) send(tries + 1); }, RETRY_PAUSE_MS);
        return true;
      }

      function send(tries) {
        var ctrl = new AbortController();
        var timedOut = false;
        var wait = tries === 1 ? limit / 2 : deadline - Date.now();
        var timer = setTimeout(function () { timedOut = true; ctrl.abort(); }, Math.max(0, wait));
        inflight = ctrl;
        fetch(url, {
          method: "POST",
          body: drawing,
          headers: { "Content-Type": "text/plain;charset=UTF-8", "Accept": "application/json" },
          mode: "cors",
          credentials: "omit",
          signal: ctrl.signal
        }).then(function (res) {
          return res.text().then(function (text) {
            return interpretReply(res.status, res.headers.get("Content-Type"), text);
          });
        }).then(function (reply) {
          clearTimeout(timer);
          if (mine !== seq) return;
          if (reply.error !== undefined && retriable(reply.status) && again(tries)) return;
          if (reply.error !== undefined) showError(errorMessage(reply));
          else showResult(Object.assign(reply, { image: drawing }));
          finish();
        }, function (err) {
          clearTimeout(timer);
          if (mine !== seq) return;                 // cleared or superseded: say nothing
          if (global.console) global.console.warn("predict try " + tries + " failed:", err);
          if (again(tries)) return;
          if (timedOut) {
            showError("The back-end at " + base + " did not answer within " +
              Math.round(limit / 1000) + " s. Try again.");
          } else {
            showError("Cannot reach the back-end at " + base +
              ". Is it running, and does it accept requests from this page?");
          }
          finish();
        });
      }
      send(1);
    }

    function clear() {
      abortInflight();
      resetCanvas();
      resetResult();
      setStatus("Draw a digit to start.", "");
    }

    predictBtn.addEventListener("click", predict);
    clearBtn.addEventListener("click", clear);

    resetCanvas();
    api.predict = predict;
    api.clear = clear;
    api.ready = true;
  }

  if (global.document) {
    if (global.document.readyState === "loading") {
      global.document.addEventListener("DOMContentLoaded", function () { start(global.document); });
    } else {
      start(global.document);
    }
  }
})(typeof window !== "undefined" ? window : this);
