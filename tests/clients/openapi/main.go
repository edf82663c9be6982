// A spec-driven API client, the strictest we can build here from an OpenAPI document: Go's
// net/http (the HTTP stack of Kata's client, which openapi-generator generates from
// cloud-hypervisor's document) with every request and every answer checked against the document
// by kin-openapi (a path and method the document lists, a request body matching its schema, an
// answer status the document lists, an answer body matching that status' schema).
//
// Usage: openapi-client SPEC. It reads one JSON call a line on stdin,
//
//	{"id": 1, "socket": "/run/api.sock", "method": "PUT", "endpoint": "vm.boot", "body": null}
//
// serves each on its own goroutine (so a blocking call such as vm.receive-migration does not
// hold the others) and writes one JSON answer a line on stdout:
//
//	{"id": 1, "status": 204, "body": "", "server": "...", "proto": "HTTP/1.1", "error": ""}
//
// "error" names a transport failure or a mismatch with the document. One http.Client per socket
// keeps its connections alive between calls, as Kata's does.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/legacy"
)

type call struct {
	ID       int     `json:"id"`
	Socket   string  `json:"socket"`
	Method   string  `json:"method"`
	Endpoint string  `json:"endpoint"`
	Body     *string `json:"body"`
}

type answer struct {
	ID     int    `json:"id"`
	Status int    `json:"status"`
	Body   string `json:"body"`
	Server string `json:"server"`
	Proto  string `json:"proto"`
	Error  string `json:"error"`
}

type clients struct {
	mu     sync.Mutex
	bySock map[string]*http.Client
}

func (c *clients) get(socket string) *http.Client {
	c.mu.Lock()
	defer c.mu.Unlock()
	if client, ok := c.bySock[socket]; ok {
		return client
	}
	transport := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var dialer net.Dialer
			return dialer.DialContext(ctx, "unix", socket)
		},
	}
	client := &http.Client{Transport: transport}
	c.bySock[socket] = client
	return client
}

func serve(router routers.Router, clients *clients, c call) answer {
	out := answer{ID: c.ID}
	// No body at all for calls without one, as a generated client sends them (Content-Length: 0);
	// an empty reader would make net/http send a chunked body.
	var body []byte
	var reader io.Reader
	if c.Body != nil {
		body = []byte(*c.Body)
		reader = bytes.NewReader(body)
	}
	request, err := http.NewRequest(c.Method, "http://localhost/api/v1/"+c.Endpoint, reader)
	if err != nil {
		out.Error = err.Error()
		return out
	}
	if c.Body != nil {
		request.Header.Set("Content-Type", "application/json")
	}
	route, params, err := router.FindRoute(request)
	if err != nil {
		out.Error = fmt.Sprintf("%s %s is not in the document: %v", c.Method, c.Endpoint, err)
		return out
	}
	ctx := context.Background()
	input := &openapi3filter.RequestValidationInput{Request: request, PathParams: params, Route: route}
	if err := openapi3filter.ValidateRequest(ctx, input); err != nil {
		out.Error = fmt.Sprintf("the request does not match the document: %v", err)
		return out
	}
	// Validation read (and may have re-encoded) the body: send the bytes as given.
	if c.Body != nil {
		request.Body = io.NopCloser(bytes.NewReader(body))
		request.ContentLength = int64(len(body))
	}
	response, err := clients.get(c.Socket).Do(request)
	if err != nil {
		out.Error = fmt.Sprintf("transport: %v", err)
		return out
	}
	defer response.Body.Close()
	data, err := io.ReadAll(response.Body)
	if err != nil {
		out.Error = fmt.Sprintf("reading the answer: %v", err)
		return out
	}
	out.Status = response.StatusCode
	out.Body = string(data)
	out.Server = response.Header.Get("Server")
	out.Proto = response.Proto
	check := &openapi3filter.ResponseValidationInput{
		RequestValidationInput: input,
		Status:                 response.StatusCode,
		Header:                 response.Header,
		Options:                &openapi3filter.Options{IncludeResponseStatus: true, MultiError: true},
	}
	check.SetBodyBytes(data)
	if err := openapi3filter.ValidateResponse(ctx, check); err != nil {
		out.Error = fmt.Sprintf("the answer does not match the document: %v", err)
	}
	return out
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: openapi-client SPEC")
		os.Exit(2)
	}
	loader := openapi3.NewLoader()
	doc, err := loader.LoadFromFile(os.Args[1])
	if err != nil {
		fmt.Fprintf(os.Stderr, "cannot load %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
	if err := doc.Validate(loader.Context); err != nil {
		fmt.Fprintf(os.Stderr, "%s is not a valid OpenAPI document: %v\n", os.Args[1], err)
		os.Exit(1)
	}
	router, err := legacy.NewRouter(doc)
	if err != nil {
		fmt.Fprintf(os.Stderr, "cannot route %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
	clients := &clients{bySock: map[string]*http.Client{}}
	var writing sync.Mutex
	var running sync.WaitGroup
	encoder := json.NewEncoder(os.Stdout)
	lines := bufio.NewScanner(os.Stdin)
	lines.Buffer(make([]byte, 1<<20), 8<<20)
	for lines.Scan() {
		var c call
		if err := json.Unmarshal(lines.Bytes(), &c); err != nil {
			fmt.Fprintf(os.Stderr, "bad call %q: %v\n", lines.Text(), err)
			os.Exit(2)
		}
		running.Add(1)
		go func() {
			defer running.Done()
			out := serve(router, clients, c)
			writing.Lock()
			defer writing.Unlock()
			if err := encoder.Encode(out); err != nil {
				fmt.Fprintf(os.Stderr, "cannot answer: %v\n", err)
				os.Exit(1)
			}
		}()
	}
	running.Wait()
}
