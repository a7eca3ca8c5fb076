// Approve / reject on the cohort page: the statement is fetched from the portal, signed in the browser with the
// officer's own Ed25519 key (WebCrypto; the key file never leaves the officer's machine), then posted. On success
// the page reloads, so what it shows (status, decisions, the form) is the portal's state after the decision.
(function () {
  const form = document.getElementById('decision-form');
  if (!form) return;
  const out = document.getElementById('sign-result');
  const cohort = form.dataset.cohort;
  const api = '/api/cohorts/' + encodeURIComponent(cohort);
  const b64 = (bytes) => btoa(Array.from(bytes, (b) => String.fromCharCode(b)).join(''));
  const detail = async (r) => {
    try { return (await r.json()).detail; } catch (e) { return 'HTTP ' + r.status; }
  };
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    out.className = '';
    out.textContent = 'signing...';
    try {
      const decision = form.querySelector('input[name=decision]:checked').value;
      const reason = document.getElementById('reason').value;
      const file = document.getElementById('keyfile').files[0];
      if (!file) throw new Error('choose your private key file');
      const pem = await file.text();
      const body = pem.replace(/-----(BEGIN|END) PRIVATE KEY-----/g, '').replace(/\s+/g, '');
      const der = Uint8Array.from(atob(body), (c) => c.charCodeAt(0));
      const key = await crypto.subtle.importKey('pkcs8', der, {name: 'Ed25519'}, false, ['sign']);
      const q = new URLSearchParams({decision: decision, reason: reason});
      const r = await fetch(api + '/statement?' + q, {credentials: 'same-origin'});
      if (!r.ok) throw new Error(await detail(r));
      const statement = await r.text();
      const sig = await crypto.subtle.sign({name: 'Ed25519'}, key, new TextEncoder().encode(statement));
      const p = await fetch(api + '/decision', {
        method: 'POST', credentials: 'same-origin',
        headers: {'Content-Type': 'application/json', 'X-Fedsynth-Request': '1'},
        body: JSON.stringify({statement: statement, signature: b64(new Uint8Array(sig))})});
      if (!p.ok) throw new Error(await detail(p));
      out.className = 'pass';
      out.textContent = 'Recorded. Reloading...';
      window.location.replace(window.location.pathname + '?decided=1');
    } catch (e) {
      out.className = 'fail';
      out.textContent = 'Not recorded: ' + e.message;
    }
  });
})();
