// Exercises what a dashboard needs from the proxy, in the browser itself, and
// writes the outcome into the DOM (#results as JSON, body[data-done]) for the
// test to read back, and into the table for the screenshot.
(function () {
  const results = { host: location.host, protocol: location.protocol, errors: [] };
  const rows = document.getElementById('checks');
  document.getElementById('location').textContent = location.href;

  function row(check, ok, detail) {
    const tr = document.createElement('tr');
    tr.innerHTML = '<td></td><td></td><td></td>';
    tr.children[0].textContent = check;
    tr.children[1].textContent = ok ? '\u2714 ok' : '\u2718 failed';
    tr.children[1].className = ok ? 'ok' : 'fail';
    tr.children[2].textContent = detail;
    rows.appendChild(tr);
  }

  async function sha256Hex(buf) {
    const d = await crypto.subtle.digest('SHA-256', buf);
    return Array.from(new Uint8Array(d), b => b.toString(16).padStart(2, '0')).join('');
  }

  function withTimeout(p, ms, what) {
    return Promise.race([p, new Promise((_, rej) => setTimeout(() => rej(new Error(what + ': timed out')), ms))]);
  }

  async function assets() {
    const vendor = new TextEncoder().encode(window.vendorBlob || '');
    results.vendorBytes = vendor.length;
    results.vendorSHA = await sha256Hex(vendor);
    row('large script (vendor.js)', vendor.length > 0, (vendor.length / 1048576).toFixed(1) + ' MiB, sha256 ' + results.vendorSHA.slice(0, 12));
    results.cssColor = getComputedStyle(document.getElementById('css-marker')).color;
    row('large stylesheet (theme.css)', results.cssColor === 'rgb(1, 2, 3)', 'last rule applied: ' + results.cssColor);
    const resp = await fetch('/api/blob');
    const blob = await resp.arrayBuffer();
    results.blobBytes = blob.byteLength;
    results.blobSHA = await sha256Hex(blob);
    row('large download (fetch)', resp.ok, (blob.byteLength / 1048576).toFixed(1) + ' MiB, sha256 ' + results.blobSHA.slice(0, 12));
  }

  // The server sends "hello" on the event stream, then holds the stream
  // open until the WebSocket below has carried a message, and only then
  // sends "bye": so both must really stream, not be buffered. Done when the
  // event stream said bye and both echoes came back.
  function liveChannels() {
    return new Promise((resolve, reject) => {
      results.sse = [];
      results.ws = [];
      let sseDone = false, wsDone = false;
      const finish = () => { if (sseDone && wsDone) resolve(); };
      const es = new EventSource('/events');
      es.addEventListener('hello', ev => {
        results.sse.push('hello:' + ev.data);
        const ws = new WebSocket('wss://' + location.host + '/ws');
        const big = 'x'.repeat(256 * 1024);
        ws.onopen = () => { ws.send('hello from the browser'); ws.send(big); };
        ws.onmessage = m => {
          results.ws.push(m.data.length > 100 ? 'echo of ' + m.data.length + ' bytes' : m.data);
          if (results.ws.length === 2) {
            row('WebSocket', true, results.ws.join(' | '));
            ws.close();
            wsDone = true;
            finish();
          }
        };
        ws.onerror = () => reject(new Error('websocket error'));
      });
      es.addEventListener('bye', ev => {
        results.sse.push('bye:' + ev.data);
        es.close();
        row('server-sent events', true, results.sse.join(' | '));
        sseDone = true;
        finish();
      });
      es.onerror = () => { if (es.readyState === EventSource.CLOSED) reject(new Error('event stream closed')); };
    });
  }

  async function run() {
    try {
      const nav = performance.getEntriesByType('navigation')[0];
      results.pageProtocol = nav ? nav.nextHopProtocol : '';
      row('page through the relay', location.protocol === 'https:', location.protocol.replace(':', '') + ' over ' + results.pageProtocol);
      row('signed in (session cookie)', true, document.getElementById('user').textContent);
      await withTimeout(assets(), 30000, 'assets');
      await withTimeout(liveChannels(), 30000, 'live channels');
    } catch (e) {
      results.errors.push(String(e && e.message || e));
      row('error', false, String(e && e.message || e));
    }
    document.getElementById('results').textContent = JSON.stringify(results);
    document.body.dataset.done = '1';
  }
  window.addEventListener('error', e => results.errors.push(e.message));
  run();
})();
