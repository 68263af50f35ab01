// Where the page sends its drawings. The deploy tasks overwrite this file on the
// front-end server with the back-end's address (the guide's step 6, automated),
// e.g.  window.DIGITS_CONFIG = { backendUrl: "http://192.168.0.12:5000" };
// backendUrl: null means "the host that served this page, port 5000".
// Optional: timeoutMs (default 10000), how long to wait for an answer (a retried
// prediction's two tries included: the first gets half of it).
window.DIGITS_CONFIG = { backendUrl: null };
