// An independent CloudEvents reader for the interop test: the CloudEvents Java SDK's Kafka
// binding (io.cloudevents:cloudevents-kafka, CloudEventDeserializer) on the official Java
// consumer. It reads a topic from the beginning of every partition and prints each record as the
// SDK decoded it, on one line:
//
//   E <partition> <offset> <key hex> <specversion> <id> <source hex> <type hex> <subject hex or ->
//     <time or -> <datacontenttype or -> <data hex or -> <extension names, comma-separated, or .>
//
// Run as a single-file source program (tests/it/support.rs: java_read_cloudevents):
//   java -cp "$KAFKA_LIB/*:$CLOUDEVENTS_LIB/*" VerifyCloudEvents.java BROKERS TOPIC COUNT TIMEOUT_MS
// It stops after COUNT records or TIMEOUT_MS and exits 0; a record the SDK cannot decode ends it
// with the SDK's exception (exit 1), which fails the test.
import io.cloudevents.CloudEvent;
import io.cloudevents.kafka.CloudEventDeserializer;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HexFormat;
import java.util.List;
import java.util.Properties;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.common.PartitionInfo;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;

public class VerifyCloudEvents {
    static String hex(byte[] b) {
        return b == null ? "-" : (b.length == 0 ? "" : HexFormat.of().formatHex(b));
    }

    static String hex(String s) {
        return s == null ? "-" : hex(s.getBytes(StandardCharsets.UTF_8));
    }

    public static void main(String[] args) {
        String brokers = args[0], topic = args[1];
        long expected = Long.parseLong(args[2]);
        long deadline = System.currentTimeMillis() + Long.parseLong(args[3]);
        Properties p = new Properties();
        p.put("bootstrap.servers", brokers);
        p.put("key.deserializer", ByteArrayDeserializer.class.getName());
        p.put("value.deserializer", CloudEventDeserializer.class.getName());
        p.put("enable.auto.commit", "false");
        p.put("isolation.level", "read_committed");
        p.put("auto.offset.reset", "earliest");
        try (KafkaConsumer<byte[], CloudEvent> c = new KafkaConsumer<>(p)) {
            List<TopicPartition> parts = new ArrayList<>();
            for (PartitionInfo i : c.partitionsFor(topic, Duration.ofSeconds(30))) {
                parts.add(new TopicPartition(topic, i.partition()));
            }
            c.assign(parts);
            c.seekToBeginning(parts);
            long n = 0;
            while (n < expected && System.currentTimeMillis() < deadline) {
                for (ConsumerRecord<byte[], CloudEvent> r : c.poll(Duration.ofMillis(200))) {
                    CloudEvent e = r.value();
                    String ext = String.join(",", e.getExtensionNames());
                    System.out.println(String.join(" ",
                        "E", String.valueOf(r.partition()), String.valueOf(r.offset()), hex(r.key()),
                        e.getSpecVersion().toString(), e.getId(), hex(e.getSource().toString()),
                        hex(e.getType()), hex(e.getSubject()),
                        e.getTime() == null ? "-" : e.getTime().toInstant().toString(),
                        e.getDataContentType() == null ? "-" : e.getDataContentType(),
                        e.getData() == null ? "-" : hex(e.getData().toBytes()),
                        ext.isEmpty() ? "." : ext));
                    n++;
                }
            }
        }
    }
}
