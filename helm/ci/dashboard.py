"""Writes helm/sluice/dashboards/sluice.json, the Grafana dashboard for the metrics in the README.

Run from the repository root: python3 helm/ci/dashboard.py
"""
import json
panels=[]
def ts(title, exprs, unit="short", x=0, y=0, w=12, h=8, desc=""):
    panels.append({
        "type":"timeseries","title":title,"description":desc,
        "datasource":{"type":"prometheus","uid":"${datasource}"},
        "gridPos":{"x":x,"y":y,"w":w,"h":h},
        "fieldConfig":{"defaults":{"unit":unit},"overrides":[]},
        "options":{"legend":{"displayMode":"list","placement":"bottom"},"tooltip":{"mode":"multi"}},
        "targets":[{"refId":chr(65+i),"expr":e,"legendFormat":l} for i,(e,l) in enumerate(exprs)],
    })
def row(title,y):
    panels.append({"type":"row","title":title,"collapsed":False,"gridPos":{"x":0,"y":y,"w":24,"h":1},"panels":[]})
def sel(extra=""):
    inner='namespace=~"$namespace"'+(","+extra if extra else "")
    return "{"+inner+"}"
HIT='result="hit"'
def q(name,p): return 'histogram_quantile(%s, sum by (le) (rate(%s_bucket%s[5m])))' % (p,name,sel())
def qby(name,p,by): return 'histogram_quantile(%s, sum by (le, %s) (rate(%s_bucket%s[5m])))' % (p,by,name,sel())
y=0
row("Traffic and admission",y); y+=1
ts("HTTP requests by route and status",[('sum by (route, status) (rate(http_requests_total%s[5m]))'%sel(),"{{route}} {{status}}")],"reqps",0,y)
ts("Admission rejections by reason",[('sum by (reason) (rate(sluice_admission_rejections_total%s[5m]))'%sel(),"{{reason}}"),('sum(rate(sluice_jobs_accepted_total%s[5m]))'%sel(),"accepted")],"reqps",12,y); y+=8
ts("HTTP latency p50 / p99 by route",[(qby("http_request_duration_seconds",0.5,"route"),"p50 {{route}}"),(qby("http_request_duration_seconds",0.99,"route"),"p99 {{route}}")],"s",0,y)
ts("Cache hit ratio",[('sum(rate(sluice_cache_lookups_total%s[5m])) / sum(rate(sluice_cache_lookups_total%s[5m]))'%(sel(HIT),sel()),"hit ratio")],"percentunit",12,y); y+=8
row("Jobs",y); y+=1
ts("Queue wait, run time, end to end (p50, p99)",[(q("sluice_job_queue_wait_seconds",0.5),"queue wait p50"),(q("sluice_job_queue_wait_seconds",0.99),"queue wait p99"),(q("sluice_job_run_seconds",0.5),"run p50"),(q("sluice_job_run_seconds",0.99),"run p99"),(q("sluice_job_end_to_end_seconds",0.5),"end to end p50"),(q("sluice_job_end_to_end_seconds",0.99),"end to end p99")],"s",0,y)
ts("Jobs finished by status",[('sum by (status) (rate(sluice_jobs_finished_total%s[5m]))'%sel(),"{{status}}")],"ops",12,y); y+=8
ts("Consumer lag by topic",[('sum by (topic) (sluice_consumer_lag%s)'%sel(),"{{topic}}")],"short",0,y,desc="Records behind the end of each topic, summed over partitions (librdkafka statistics, every 5 s).")
ts("Dead-lettered events",[('sum by (topic, reason) (rate(sluice_dead_lettered_total%s[5m]))'%sel(),"{{topic}} {{reason}}")],"ops",12,y); y+=8
row("Workers and models",y); y+=1
ts("Worker in flight and window",[('sum(sluice_worker_in_flight%s)'%sel(),"in flight"),('sum(sluice_worker_window_occupancy%s)'%sel(),"held (waiting + running)"),('sum(sluice_worker_window_capacity%s)'%sel(),"capacity")],"short",0,y)
ts("Model latency by model and outcome (p50, p99)",[(qby("sluice_model_request_duration_seconds",0.5,"model, outcome"),"p50 {{model}} {{outcome}}"),(qby("sluice_model_request_duration_seconds",0.99,"model, outcome"),"p99 {{model}} {{outcome}}")],"s",12,y); y+=8
ts("Retries and fallbacks",[('sum by (model) (rate(sluice_model_retries_total%s[5m]))'%sel(),"retries {{model}}"),('sum by (model, to) (rate(sluice_model_fallbacks_total%s[5m]))'%sel(),"fallback {{model}} -> {{to}}")],"ops",0,y)
ts("Circuit state and concurrency limit by backend",[('max by (backend) (sluice_circuit_state%s)'%sel(),"circuit {{backend}} (0 closed, 1 half-open, 2 open)"),('avg by (backend) (sluice_model_concurrency_limit%s)'%sel(),"limit {{backend}}")],"short",12,y); y+=8
row("Results",y); y+=1
ts("Open SSE connections",[('sum(sluice_sse_connections%s)'%sel(),"streams")],"short",0,y)
ts("Results writes: transaction p99 (s) and events per batch",[(q("sluice_results_write_duration_seconds",0.99),"write p99"),('sum(rate(sluice_results_batch_events_sum%s[5m])) / sum(rate(sluice_results_batch_events_count%s[5m]))'%(sel(),sel()),"events per batch")],"short",12,y); y+=8
row("In-process embedding model",y); y+=1
ts("Forward pass time (p50, p99)",[(q("sluice_embedding_forward_seconds",0.5),"p50"),(q("sluice_embedding_forward_seconds",0.99),"p99")],"s",0,y)
ts("Texts per forward pass (dynamic batching)",[('sum(rate(sluice_embedding_batch_texts_sum%s[5m])) / sum(rate(sluice_embedding_batch_texts_count%s[5m]))'%(sel(),sel()),"mean batch"),('sum(rate(sluice_embedding_batch_texts_sum%s[5m]))'%sel(),"texts/s")],"short",12,y); y+=8
row("Webhooks",y); y+=1
ts("Webhook deliveries and attempts by outcome",[('sum by (outcome) (rate(sluice_webhook_deliveries_total%s[5m]))'%sel(),"delivery {{outcome}}"),('sum by (outcome) (rate(sluice_webhook_attempts_total%s[5m]))'%sel(),"attempt {{outcome}}"),('sum(rate(sluice_webhook_enqueued_total%s[5m]))'%sel(),"enqueued")],"ops",0,y)
ts("Webhook delay (terminal status to delivery) and queue depth",[(q("sluice_webhook_delivery_delay_seconds",0.5),"delay p50 (s)"),(q("sluice_webhook_delivery_delay_seconds",0.99),"delay p99 (s)"),('max(sluice_webhook_queue_depth%s)'%sel(),"pending deliveries")],"short",12,y); y+=8
dash={
 "title":"Sluice","uid":"sluice-overview","schemaVersion":39,"version":1,"editable":True,
 "tags":["sluice","inference","kafka"],"time":{"from":"now-1h","to":"now"},"refresh":"30s",
 "templating":{"list":[
   {"name":"datasource","type":"datasource","query":"prometheus","label":"Prometheus"},
   {"name":"namespace","type":"query","datasource":{"type":"prometheus","uid":"${datasource}"},"query":"label_values(sluice_jobs_accepted_total, namespace)","includeAll":True,"allValue":".*","multi":True,"refresh":2,"label":"Namespace"}]},
 "panels":panels,
}
json.dump(dash,open('helm/sluice/dashboards/sluice.json','w'),indent=2)
print(len(panels))
